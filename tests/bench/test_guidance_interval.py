"""The unconditional pass runs only inside each row's guidance interval: counted through StepStats and the
runner, against an independent count of the time grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from bench.common import enliven_
from bench.flops import forwards_per_image
from models.runtime import RunnerConfig, torch_runner
from models.sampling import SampleRequest, StepStats, get_sampler


def _guided_steps(sampler: str, steps: int, low: float, high: float) -> int:
    """Steps whose t_cur lies in [low, high], from numpy grids (SDE: linspace(1, 0.04, S); ODE: linspace(1, 0, S+1))."""
    t = np.linspace(1.0, 0.04, steps) if sampler == "sde" else np.linspace(1.0, 0.0, steps + 1)[:steps]
    return int(((t >= low) & (t <= high)).sum())


@pytest.fixture(scope="module")
def den():
    torch.manual_seed(0)
    sit = enliven_(models.create_model("sit-tiny-64x32").eval())
    return sit, torch_runner(sit, "denoiser", "cpu", RunnerConfig(precision="fp32", buckets=(4, 8, 16)))


def _run(sit, den, sampler: str, reqs: list[SampleRequest]) -> StepStats:
    s = get_sampler(sampler, sit)
    rows = [s.init_row(r, (64, 32)) for r in reqs]
    total = StepStats()
    while not all(r.done for r in rows):
        st = s.step(den, [r for r in rows if not r.done])
        for k in ("rows", "model_rows", "uncond_rows", "forwards"):
            setattr(total, k, getattr(total, k) + getattr(st, k))
    return total


@pytest.mark.parametrize("sampler", ["sde", "euler"])
def test_uncond_rows_only_inside_the_interval(den, sampler: str) -> None:
    sit, runner = den
    steps, n = 12, 3
    reqs = [SampleRequest(class_id=i, seed=i, steps=steps, cfg_scale=1.75, guidance_low=0.0, guidance_high=0.7,
                          sampler=sampler, path_type="cosine") for i in range(n)]
    before = runner.stats.rows
    st = _run(sit, runner, sampler, reqs)
    guided = _guided_steps(sampler, steps, 0.0, 0.7)
    assert 0 < guided < steps
    assert st.forwards == steps and st.rows == n * steps
    assert st.uncond_rows == n * guided
    assert st.model_rows == n * (steps + guided)  # not 2 * n * steps
    assert runner.stats.rows - before == st.model_rows  # the runner saw exactly those rows (padding aside)
    assert forwards_per_image(sampler, steps, 1.75, 0.0, 0.7) == (steps, guided)


def test_rows_with_different_intervals_and_scales_in_one_batch(den) -> None:
    sit, runner = den
    steps = 10
    specs = [(1.75, 0.0, 0.7), (1.75, 0.0, 1.0), (1.0, 0.0, 1.0), (4.0, 0.25, 0.55)]  # bounds off the grid: numpy and torch linspace round differently
    reqs = [SampleRequest(class_id=i, seed=i, steps=steps, cfg_scale=s, guidance_low=lo, guidance_high=hi,
                          sampler="euler") for i, (s, lo, hi) in enumerate(specs)]
    st = _run(sit, runner, "euler", reqs)
    expected = sum(_guided_steps("euler", steps, lo, hi) if s > 1 else 0 for s, lo, hi in specs)
    assert st.uncond_rows == expected
    assert st.model_rows == len(specs) * steps + expected


def test_heun_counts_match_the_flop_model(den) -> None:
    sit, runner = den
    steps = 6
    reqs = [SampleRequest(class_id=0, seed=0, steps=steps, cfg_scale=1.75, guidance_high=0.7, sampler="heun")]
    st = _run(sit, runner, "heun", reqs)
    cond, uncond = forwards_per_image("heun", steps, 1.75, 0.0, 0.7)
    assert st.model_rows == cond + uncond and cond == 2 * steps - 1


def test_no_guidance_no_uncond_rows() -> None:
    assert forwards_per_image("sde", 250, 1.0, 0.0, 1.0) == (250, 0)
    assert forwards_per_image("sde", 250, 1.75, 0.0, 0.7) == (250, _guided_steps("sde", 250, 0.0, 0.7))
    assert forwards_per_image("euler", 250, 1.75, 0.0, 0.7) == (250, _guided_steps("euler", 250, 0.0, 0.7))
