"""Step-level generation scheduler: joining at step boundaries, leaving when done, capacity, isolation of
failures, and (with the real tiny SiT and samplers) results independent of what shares the batch."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

import models
from models.sampling import get_sampler
from models.sampling.base import Row, SampleRequest, StepStats, run_to_completion
from server.engine.scheduler import GenerationScheduler, _restore, _snapshot
from server.queue import GeneratePayload, Job

SHAPE = (4, 2)


class CountingSampler:
    """x starts at the seed; each step adds model_fn's output (which here is class_id + 1)."""

    name = "count"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def init_row(self, request: SampleRequest, shape: tuple[int, int]) -> Row:
        return Row(request=request, x=torch.full(shape, float(request.seed), dtype=torch.float64),
                   generator=torch.Generator().manual_seed(request.seed), total=request.steps)

    def step(self, model_fn, rows: Sequence[Row]) -> StepStats:  # type: ignore[no-untyped-def]
        self.batches.append(len(rows))
        x = torch.stack([r.x for r in rows]).float()
        y = torch.tensor([r.request.class_id for r in rows])
        out = model_fn(x, torch.zeros(len(rows)), y)
        for r, o in zip(rows, out, strict=True):
            r.x = r.x + o.double()
            r.step += 1
        return StepStats(rows=len(rows), model_rows=len(rows), forwards=1)

    def result(self, row: Row) -> torch.Tensor:
        return row.x


def class_plus_one(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if bool((y == 13).any()):
        raise RuntimeError("class 13 is cursed")
    return torch.zeros_like(x) + (y.float() + 1)[:, None, None]


def _job(n: int, steps: int, class_id: int = 0, seed: int = 0, sampler: str = "count") -> Job:
    reqs = [SampleRequest(class_id=class_id, seed=seed + i, steps=steps, sampler=sampler) for i in range(n)]
    return Job(model="gen", payload=GeneratePayload(reqs), request_id=f"c{class_id}s{seed}")


def _sched(sampler: CountingSampler, max_rows: int = 8) -> GenerationScheduler:
    return GenerationScheduler(lambda name: sampler, class_plus_one, SHAPE, max_rows)


def test_rows_join_at_the_next_step_and_leave_when_done() -> None:
    sampler = CountingSampler()
    s = _sched(sampler)
    a = _job(2, steps=3, class_id=1, seed=10)
    s.admit(a)
    assert s.waiting_rows == 2 and s.running_rows == 0 and s.free_rows == 6
    assert s.step().finished == []
    b = _job(1, steps=2, class_id=4, seed=100)
    s.admit(b)
    assert s.step().finished == []
    out = s.step()  # a: 3 steps done; b: joined at step 2, its 2 steps done
    assert sorted(j.request_id for j, _, _ in out.finished) == ["c1s10", "c4s100"]
    assert sampler.batches == [2, 3, 3]
    lat = {j.request_id: x for j, x, _ in out.finished}
    assert lat["c1s10"][:, 0, 0].tolist() == [10 + 3 * 2, 11 + 3 * 2]
    assert lat["c4s100"][:, 0, 0].tolist() == [100 + 2 * 5]
    assert len(s) == 0 and s.running_rows == 0


def test_capacity_rows_wait_until_room() -> None:
    sampler = CountingSampler()
    s = _sched(sampler, max_rows=2)
    s.admit(_job(2, steps=2))
    s.admit(_job(1, steps=1, seed=5))
    assert s.free_rows == -1  # a worker takes no new job now
    s.step()
    s.step()  # first job done here; the second joins only at the next step
    out = s.step()
    assert sampler.batches == [2, 2, 1] and [j.request_id for j, _, _ in out.finished] == ["c0s5"]


def test_rows_of_one_job_may_have_different_lengths() -> None:
    sampler = CountingSampler()
    s = _sched(sampler)
    reqs = [SampleRequest(class_id=0, seed=0, steps=1, sampler="count"),
            SampleRequest(class_id=0, seed=0, steps=3, sampler="count")]
    s.admit(Job(model="gen", payload=GeneratePayload(reqs), request_id="mixed"))
    assert s.step().finished == [] and s.running_rows == 1  # the 1-step row no longer holds a slot
    assert s.step().finished == []
    (job, lat, _), = s.step().finished
    assert lat[:, 0, 0].tolist() == [1.0, 3.0]


def test_a_failing_job_fails_alone() -> None:
    sampler = CountingSampler()
    s = _sched(sampler)
    good, bad, good2 = _job(1, 2, class_id=2), _job(1, 2, class_id=13), _job(2, 2, class_id=3, seed=7)
    for j in (good, bad, good2):
        s.admit(j)
    out = s.step()
    assert [(j.request_id, str(e)) for j, e in out.failed] == [("c13s0", "class 13 is cursed")]
    out = s.step()
    assert {j.request_id for j, _, _ in out.finished} == {"c2s0", "c3s7"}
    fin = {j.request_id: x for j, x, _ in out.finished}
    assert fin["c3s7"][:, 0, 0].tolist() == [7 + 8, 8 + 8]


def test_drop_removes_rows_at_once() -> None:
    sampler = CountingSampler()
    s = _sched(sampler)
    a, b = _job(2, 5), _job(1, 5, seed=3)
    s.admit(a)
    s.admit(b)
    s.step()
    assert s.drop([a.id, "unknown"]) == [a]
    s.step()
    assert sampler.batches == [3, 1]


def test_one_sampler_per_job() -> None:
    s = _sched(CountingSampler())
    reqs = [SampleRequest(class_id=0, seed=0, steps=1, sampler="a"), SampleRequest(0, 0, 1, sampler="b")]
    with pytest.raises(ValueError, match="one sampler"):
        s.admit(Job(model="gen", payload=GeneratePayload(reqs), request_id="x"))


# ---------------------------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def tiny_sit() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create_model("sit-tiny-64x32").eval()


def _fn(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x, t, y)
    return fn


@pytest.mark.parametrize("sampler_name", ["sde", "euler", "heun"])
def test_real_rows_do_not_depend_on_their_batch(tiny_sit: torch.nn.Module, sampler_name: str) -> None:
    cfg = tiny_sit.config
    shape = (cfg.num_tokens, cfg.token_dim)
    sampler = get_sampler(sampler_name, cfg)
    s = GenerationScheduler(lambda name: sampler, _fn(tiny_sit), shape, max_rows=16)
    specs = [(1, 3, 1.0, (0.0, 1.0), 4), (7, 11, 4.0, (0.0, 0.5), 3), (999, 5, 2.5, (0.3, 1.0), 5)]
    jobs = []
    for i, (cls, seed, scale, (lo, hi), steps) in enumerate(specs):
        reqs = [SampleRequest(class_id=cls, seed=seed + k, steps=steps, cfg_scale=scale, guidance_low=lo,
                              guidance_high=hi, sampler=sampler_name, path_type=cfg.path_type) for k in range(2)]
        jobs.append(Job(model="gen", payload=GeneratePayload(reqs), request_id=f"j{i}"))
    s.admit(jobs[0])
    got: dict[str, torch.Tensor] = {}
    for n in range(20):
        if n == 1:
            s.admit(jobs[1])  # joins a running batch mid-way
        if n == 2:
            s.admit(jobs[2])
        got.update({j.request_id: x for j, x, _ in s.step().finished})
        if len(got) == 3:
            break
    for job in jobs:
        alone = run_to_completion(sampler, _fn(tiny_sit), job.payload.requests, shape)  # type: ignore[union-attr]
        assert torch.allclose(got[job.request_id], alone, atol=1e-5), job.request_id


def test_survivors_of_a_failed_step_match_running_alone(tiny_sit: torch.nn.Module) -> None:
    """The SDE draws each row's noise before the model call: a failed batched step must not consume it."""
    cfg = tiny_sit.config
    shape = (cfg.num_tokens, cfg.token_dim)
    sampler = get_sampler("sde", cfg)
    real = _fn(tiny_sit)

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if bool((y == 13).any()):
            raise RuntimeError("cursed")
        return real(x, t, y)

    s = GenerationScheduler(lambda name: sampler, fn, shape, max_rows=8)
    good = Job(model="gen", request_id="good", payload=GeneratePayload(
        [SampleRequest(class_id=2, seed=21, steps=4, cfg_scale=2.0, sampler="sde", path_type=cfg.path_type)]))
    bad = Job(model="gen", request_id="bad", payload=GeneratePayload(
        [SampleRequest(class_id=13, seed=5, steps=4, sampler="sde", path_type=cfg.path_type)]))
    s.admit(good)
    s.step()
    s.admit(bad)  # fails on its first step, when good is at step 2
    finished, failed = [], []
    for _ in range(5):
        out = s.step()
        finished += out.finished
        failed += out.failed
    assert [j.request_id for j, _ in failed] == ["bad"] and [j.request_id for j, _, _ in finished] == ["good"]
    alone = run_to_completion(sampler, real, good.payload.requests, shape)  # type: ignore[union-attr]
    assert torch.allclose(finished[0][1], alone, atol=1e-6)


def test_snapshot_restores_rows_written_in_place_alike_or_not() -> None:
    """The snapshot before each step copies rows of one shape in one stack, others one by one; either way a
    restore undoes in-place writes to ``x`` (MAR, VAR), the step and the noise drawn."""
    sampler = get_sampler("sde", "sit")
    alike = [sampler.init_row(SampleRequest(1, seed=i, steps=5), (4, 2)) for i in range(3)]
    odd = sampler.init_row(SampleRequest(1, seed=9, steps=5), (3, 2))
    for rows in (alike, [*alike, odd]):
        before = [(r.x.clone(), r.step, r.generator.get_state()) for r in rows]
        saved = _snapshot(rows)
        for r in rows:
            r.x.add_(1.0)
            r.step += 1
            torch.randn(2, generator=r.generator)
        _restore(rows, saved)
        for r, (x, step, rng) in zip(rows, before, strict=True):
            assert torch.equal(r.x, x) and r.step == step and torch.equal(r.generator.get_state(), rng)
