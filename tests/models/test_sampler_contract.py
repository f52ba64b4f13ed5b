"""The step-sampler contract (``models/sampling/base.py``), run over every sampler of every registered family on
that family's smallest registered configuration: ``init_row`` draws a row's noise from its own seed,
``step`` advances every row by exactly one step of its own schedule, ``result`` has the family's sample shape
and dtype, and a row's result does not depend on its batch-mates, nor on when it joined the running batch.

The model runs in float64 (module families get ``dtype=torch.float64``; ``model_fn`` families a float64 copy
behind a float32 interface), so batched and single evaluations agree to round-off and sampled codes agree
exactly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from registry_cases import build, sampler_cases, sampler_kwargs

from models.registry import get_config
from models.sampling import SampleRequest, get_sampler, run_to_completion, sampler_family

CASES = sampler_cases()
IDS = [f"{cfg}:{name}" for cfg, name in CASES]


def _setup(config: str, name: str) -> tuple[Any, Any, tuple[int, ...], Any]:
    """(sampler, the model it steps, sample shape, sample spec) for ``config``'s sampler ``name``."""
    cfg = get_config(config)
    entry = sampler_family(cfg.family)
    module = build(config, dtype=torch.float64)
    sampler = get_sampler(name, cfg, **sampler_kwargs(config, entry.model_input, entry.needs_tokenizer,
                                                       torch.float64))
    if entry.model_input == "model_fn":
        def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return module(x.double(), t.double(), y).float()
    else:
        model = module
    spec = cfg.sample_spec()
    return sampler, model, spec.shape, spec


def _requests(config: str, name: str, n: int) -> list[SampleRequest]:
    """``n`` rows that differ in class, seed, guidance scale and interval; 3 steps unless the family's count
    is fixed."""
    cfg = get_config(config)
    steps = cfg.steps if sampler_family(cfg.family).fixed_steps else 3
    scales, classes = (1.0, 3.0, 1.5), cfg.classes
    return [SampleRequest(class_id=classes[(7 * i) % len(classes)], seed=100 + i, steps=steps,
                          cfg_scale=scales[i % 3], guidance_low=0.0, guidance_high=1.0 if i % 2 == 0 else 0.5,
                          sampler=name, path_type=cfg.path_type)
            for i in range(n)]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.is_floating_point():
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize(("config", "name"), CASES, ids=IDS)
def test_init_row_is_a_function_of_the_request(config: str, name: str) -> None:
    sampler, _, shape, _ = _setup(config, name)
    req = _requests(config, name, 1)[0]
    a, b = sampler.init_row(req, shape), sampler.init_row(req, shape)
    assert a.step == 0 and not a.done and a.total >= 1 and a.request == req
    _close(a.x, b.x)


@pytest.mark.parametrize(("config", "name"), CASES, ids=IDS)
def test_step_advances_each_row_once_and_results_have_the_sample_spec(config: str, name: str) -> None:
    sampler, model, shape, spec = _setup(config, name)
    rows = [sampler.init_row(r, shape) for r in _requests(config, name, 3)]
    total = rows[0].total
    for k in range(1, total + 1):
        stats = sampler.step(model, [r for r in rows if not r.done])
        assert stats.rows == 3 and stats.forwards >= 1
        assert all(r.step == k for r in rows)
    assert all(r.done for r in rows)
    outs = [sampler.result(r) for r in rows]
    for out in outs:
        assert tuple(out.shape) == spec.shape
        assert out.is_floating_point() == (spec.dtype == "float32")
        if spec.codebook_size is not None:
            assert 0 <= int(out.min()) and int(out.max()) < spec.codebook_size
    assert not torch.equal(outs[0], outs[1])  # other seed and class: another sample


@pytest.mark.parametrize(("config", "name"), CASES, ids=IDS)
def test_a_rows_result_is_independent_of_its_batch(config: str, name: str) -> None:
    sampler, model, shape, _ = _setup(config, name)
    reqs = _requests(config, name, 3)
    together = run_to_completion(sampler, model, reqs, shape)
    for i, r in enumerate(reqs):
        _close(together[i], run_to_completion(sampler, model, [r], shape)[0])


@pytest.mark.parametrize(("config", "name"), CASES, ids=IDS)
def test_a_row_joining_a_running_batch_gets_the_same_result(config: str, name: str) -> None:
    """Step-level batching: row B joins after row A's first step; both end as they would alone."""
    sampler, model, shape, _ = _setup(config, name)
    a_req, b_req = _requests(config, name, 2)
    a = sampler.init_row(a_req, shape)
    sampler.step(model, [a])
    b = sampler.init_row(b_req, shape)
    while not (a.done and b.done):
        sampler.step(model, [r for r in (a, b) if not r.done])
    _close(sampler.result(a), run_to_completion(sampler, model, [a_req], shape)[0])
    _close(sampler.result(b), run_to_completion(sampler, model, [b_req], shape)[0])
