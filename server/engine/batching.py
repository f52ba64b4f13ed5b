"""Dynamic batching policy for encode / decode: pure asyncio, no model, no device, clock injectable.

A :class:`Batcher` pulls jobs of one kind through a ``take(max_n, timeout)`` function (the queue's worker
side) and returns a batch of jobs with the same shape key: up to ``max_rows`` rows, or whatever arrived within
``max_wait_s`` of the first job. :func:`row_chunked` makes a model call batch-invariant. :func:`run_isolated` runs a batch and, when it fails, re-runs it job by job
so that one bad job fails alone. :func:`run_chunked` concatenates the jobs' rows into model calls of at most
``max_rows`` rows and splits the outputs back per job.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from server.queue.base import Job

TakeFn = Callable[[int, float | None], Awaitable[list[Job]]]
T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    max_rows: int
    max_wait_s: float
    idle_timeout_s: float = 0.5  # how long an idle worker waits before looking up (heartbeats, stop)
    invariant_rows: int = 0  # >0: every model call runs in calls of this many rows (see ``row_chunked``)


class Batcher:
    def __init__(self, take: TakeFn, policy: BatchPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._take = take
        self.policy = policy
        self._clock = clock
        self._carry: list[Job] = []  # jobs already taken whose shape differs from the last batch's

    @property
    def carried(self) -> int:
        return len(self._carry)

    async def next_batch(self) -> list[Job]:
        """The next batch, or ``[]`` after ``idle_timeout_s`` with no job. A batch holds jobs of one shape
        key and at most ``max_rows`` rows (a single larger job runs alone, split by :func:`run_chunked`);
        jobs that do not fit are carried, first in line for the next batch."""
        p = self.policy
        pool, self._carry = self._carry, []
        if not pool:
            pool = await self._take(p.max_rows, p.idle_timeout_s)
            if not pool:
                return []
        key = pool[0].payload.shape_key
        batch: list[Job] = []
        rows = 0

        def offer(jobs: list[Job]) -> None:
            nonlocal rows
            for j in jobs:
                if j.payload.shape_key == key and (not batch or rows + j.rows <= p.max_rows):
                    batch.append(j)
                    rows += j.rows
                else:
                    self._carry.append(j)

        offer(pool)
        end = self._clock() + p.max_wait_s
        while rows < p.max_rows and not any(j.payload.shape_key == key for j in self._carry):
            left = end - self._clock()
            more = await self._take(p.max_rows - rows, max(left, 0.0))
            offer(more)
            if not more or left <= 0:
                break
        return batch


async def run_isolated(
    jobs: Sequence[Job], execute: Callable[[list[Job]], Awaitable[list[T]]]
) -> list[tuple[Job, T | BaseException]]:
    """Run ``execute(jobs)``; if it raises, run each job alone, so only the jobs that fail alone fail.
    Returns ``(job, output or exception)`` in the order of ``jobs``."""
    try:
        outs = await execute(list(jobs))
        return list(zip(jobs, outs, strict=True))
    except Exception as batch_error:
        if len(jobs) == 1:
            return [(jobs[0], batch_error)]
    results: list[tuple[Job, T | BaseException]] = []
    for job in jobs:
        try:
            results.append((job, (await execute([job]))[0]))
        except Exception as e:
            results.append((job, e))
    return results


def run_chunked(fn: Callable[[torch.Tensor], torch.Tensor], inputs: Sequence[torch.Tensor],
                max_rows: int) -> tuple[list[torch.Tensor], list[int]]:
    """Concatenate ``inputs`` (each (B_i, ...)) along rows, call ``fn`` on chunks of at most ``max_rows``
    rows, and split the outputs back: returns (outputs per input, the chunk sizes that ran)."""
    x = torch.cat(list(inputs)) if len(inputs) > 1 else inputs[0]
    outs, sizes = [], []
    for start in range(0, x.shape[0], max_rows):
        chunk = x[start:start + max_rows]
        outs.append(fn(chunk))
        sizes.append(int(chunk.shape[0]))
    y = torch.cat(outs) if len(outs) > 1 else outs[0]
    return list(torch.split(y, [int(t.shape[0]) for t in inputs])), sizes


def row_chunked(fn: Callable[..., torch.Tensor], rows: int) -> Callable[..., torch.Tensor]:
    """``fn`` made batch-invariant: every tensor argument (all (N, ...), same N) is cut into calls of ``rows``
    rows (the last call may be smaller, so only ``rows=1`` is strictly invariant; larger values trade some
    invariance for fewer calls) and the outputs are concatenated. CPU kernels (oneDNN convolutions, MKL/oneDNN GEMMs) choose their
    blocking and reduction order from the problem size, so one row's result can change in the last bit with
    the number of rows beside it; with calls of a fixed size (``rows=1``: one row per call) the shapes the
    kernels see never depend on the batch. ``rows <= 0`` returns ``fn`` itself."""
    if rows <= 0:
        return fn

    def call(*args: torch.Tensor) -> torch.Tensor:
        n = int(args[0].shape[0])
        if n <= rows:
            return fn(*args)
        outs = [fn(*(a[s:s + rows] for a in args)) for s in range(0, n, rows)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call
