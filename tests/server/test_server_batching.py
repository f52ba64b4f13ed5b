"""Dynamic batching policy with a scripted source and a fake clock (no model, no sleeping)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine.batching import Batcher, BatchPolicy, run_chunked, run_isolated
from server.queue import DecodePayload, Job


def _job(rows: int = 1, L: int = 4, name: str = "") -> Job:
    return Job(model="tok", payload=DecodePayload(torch.zeros(rows, L, 3)), request_id=name or "r")


class ScriptedSource:
    """Jobs that arrive at given fake times; ``take`` advances the fake clock like a real wait would."""

    def __init__(self, arrivals: list[tuple[float, Job]]) -> None:
        self.now = 0.0
        self.pending = sorted(arrivals, key=lambda a: a[0])
        self.calls: list[tuple[int, float | None]] = []

    def clock(self) -> float:
        return self.now

    async def take(self, max_n: int, timeout: float | None) -> list[Job]:
        self.calls.append((max_n, timeout))
        ready = [j for t, j in self.pending if t <= self.now]
        if not ready:
            upcoming = [t for t, _ in self.pending]
            limit = self.now + (timeout if timeout is not None else float("inf"))
            if not upcoming or upcoming[0] > limit:
                self.now = limit if timeout is not None else self.now
                return []
            self.now = upcoming[0]
            ready = [j for t, j in self.pending if t <= self.now]
        out = ready[:max_n]
        self.pending = [(t, j) for t, j in self.pending if j not in out]
        return out


def _batch(src: ScriptedSource, policy: BatchPolicy) -> list[Job]:
    return asyncio.run(Batcher(src.take, policy, clock=src.clock).next_batch())


def test_fills_up_to_max_rows_without_waiting() -> None:
    jobs = [_job() for _ in range(6)]
    src = ScriptedSource([(0.0, j) for j in jobs])
    batch = _batch(src, BatchPolicy(max_rows=4, max_wait_s=0.01))
    assert batch == jobs[:4] and src.now == 0.0


def test_waits_at_most_max_wait_after_first_job() -> None:
    a, b, c = _job(), _job(), _job()
    src = ScriptedSource([(0.2, a), (0.204, b), (0.22, c)])  # c arrives after the window
    batch = _batch(src, BatchPolicy(max_rows=8, max_wait_s=0.01))
    assert batch == [a, b]
    assert src.now == pytest.approx(0.21)


def test_idle_returns_empty_after_idle_timeout() -> None:
    src = ScriptedSource([])
    assert _batch(src, BatchPolicy(max_rows=8, max_wait_s=0.01, idle_timeout_s=0.5)) == []
    assert src.calls == [(8, 0.5)] and src.now == 0.5


def test_batching_off_takes_one_job() -> None:
    jobs = [_job() for _ in range(3)]
    src = ScriptedSource([(0.0, j) for j in jobs])
    assert _batch(src, BatchPolicy(max_rows=1, max_wait_s=1.0)) == jobs[:1]


def test_rows_not_jobs_are_counted_and_what_does_not_fit_goes_next() -> None:
    big, small, one, huge = _job(rows=3), _job(rows=2), _job(rows=1), _job(rows=9)
    src = ScriptedSource([(0.0, big), (0.0, small), (0.0, one), (0.0, huge)])

    async def batches() -> list[list[Job]]:
        batcher = Batcher(src.take, BatchPolicy(max_rows=4, max_wait_s=0.01), clock=src.clock)
        return [await batcher.next_batch() for _ in range(3)]

    first, second, third = asyncio.run(batches())
    assert first == [big, one]  # 3 + 1 rows; small (2) does not fit and is first in the next batch
    assert second == [small]  # huge (9 rows) does not fit with small...
    assert third == [huge]  # ...and runs alone (run_chunked splits it into model calls of 4)


def test_shapes_are_not_mixed_and_the_rest_is_carried() -> None:
    a1, b1, a2 = _job(L=4), _job(L=8), _job(L=4)
    src = ScriptedSource([(0.0, a1), (0.0, b1), (0.0, a2)])

    async def two() -> tuple[list[Job], list[Job]]:
        batcher = Batcher(src.take, BatchPolicy(max_rows=8, max_wait_s=0.01), clock=src.clock)
        return await batcher.next_batch(), await batcher.next_batch()

    first, second = asyncio.run(two())
    assert first == [a1, a2] and second == [b1]


def test_run_isolated_fails_only_the_bad_job() -> None:
    jobs = [_job(name=n) for n in ("ok1", "bad", "ok2")]
    calls: list[list[str]] = []

    async def execute(batch: list[Job]) -> list[str]:
        calls.append([j.request_id for j in batch])
        if any(j.request_id == "bad" for j in batch):
            raise RuntimeError("model exploded")
        return [f"out-{j.request_id}" for j in batch]

    results = asyncio.run(run_isolated(jobs, execute))
    assert calls == [["ok1", "bad", "ok2"], ["ok1"], ["bad"], ["ok2"]]
    assert results[0] == (jobs[0], "out-ok1") and results[2] == (jobs[2], "out-ok2")
    assert isinstance(results[1][1], RuntimeError)


def test_run_chunked_splits_rows_and_preserves_order() -> None:
    inputs = [torch.arange(3.0).reshape(3, 1), torch.arange(3.0, 8.0).reshape(5, 1), torch.tensor([[8.0]])]
    seen: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x * 10

    outs, sizes = run_chunked(fn, inputs, max_rows=4)
    assert sizes == seen == [4, 4, 1]
    assert [o.flatten().tolist() for o in outs] == [[0, 10, 20], [30, 40, 50, 60, 70], [80]]
