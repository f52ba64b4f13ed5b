"""The in-process queue backend (default): asyncio, API and worker in one process and one event loop."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server.errors import DeadlineExceeded, InvalidValue, ModelFailed, QueueFull, ShuttingDown, TokservError
from server.queue.base import Job, JobQueue, JobResult

MAX_IDEMPOTENCY_ENTRIES = 4096


@dataclass
class _Remembered:
    fingerprint: str | None
    future: asyncio.Future[JobResult]
    expires_at: float = float("inf")  # set when the job finishes


class InProcessQueue(JobQueue):
    """Bounded FIFO per kind. ``capacity`` bounds the jobs *waiting* per kind (not yet taken): a full kind
    answers QueueFull at once. ``clock`` gives wall-clock seconds (deadlines are wall-clock)."""

    def __init__(self, capacity: int, *, idempotency_ttl_s: float = 600.0, retry_after_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.capacity = capacity
        self.idempotency_ttl_s = idempotency_ttl_s
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._pending: dict[str, deque[Job]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._futures: dict[str, asyncio.Future[JobResult]] = {}  # every accepted, unfinished job
        self._remembered: OrderedDict[str, _Remembered] = OrderedDict()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    # ------------------------------------------------------------------ API side
    async def submit(self, job: Job) -> JobResult:
        if self._closed:
            raise ShuttingDown("the server is shutting down", retry_after=self.retry_after_s)
        if job.idempotency_key is not None:
            self._forget_expired()
            seen = self._remembered.get(job.idempotency_key)
            if seen is not None:
                if seen.fingerprint != job.fingerprint:
                    raise InvalidValue("Idempotency-Key was already used with a different request")
                return await self._wait(seen.future, job.deadline)
        pending = self._pending.setdefault(job.kind, deque())
        if len(pending) >= self.capacity:
            raise QueueFull(f"queue {job.kind!r} is full ({self.capacity} waiting); retry later",
                            retry_after=self.retry_after_s)
        if job.expired(self._clock()):
            raise DeadlineExceeded("the deadline passed before the request was queued")
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume)
        self._futures[job.id] = future
        self._idle.clear()
        if job.idempotency_key is not None:
            self._remembered[job.idempotency_key] = _Remembered(job.fingerprint, future)
            while len(self._remembered) > MAX_IDEMPOTENCY_ENTRIES:
                self._remembered.popitem(last=False)
        pending.append(job)
        self._event(job.kind).set()
        try:
            return await self._wait(future, job.deadline)
        except (DeadlineExceeded, asyncio.CancelledError):
            self._abandon(job)
            raise

    async def _wait(self, future: asyncio.Future[JobResult], deadline: float | None) -> JobResult:
        timeout = None if deadline is None else deadline - self._clock()
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("deadline passed")
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise DeadlineExceeded("deadline passed before the result was ready") from None
        except asyncio.CancelledError:
            if future.cancelled():  # another submitter of the same idempotency key gave up
                raise DeadlineExceeded("the request sharing this Idempotency-Key was abandoned") from None
            raise

    def _abandon(self, job: Job) -> None:
        """The caller gave up: drop the job if still waiting; a worker holding it will see it cancelled."""
        pending = self._pending.get(job.kind)
        if pending is not None:
            try:
                pending.remove(job)
            except ValueError:
                pass
        future = self._futures.pop(job.id, None)
        if future is not None and not future.done():
            future.cancel()
        if job.idempotency_key is not None:
            seen = self._remembered.get(job.idempotency_key)
            if seen is not None and seen.future is future:
                del self._remembered[job.idempotency_key]
        self._check_idle()

    # ------------------------------------------------------------------ worker side
    async def take(self, kind: str, max_n: int, timeout: float | None) -> list[Job]:
        end = None if timeout is None else self._clock() + timeout
        while True:
            jobs = self._pop(kind, max_n)
            if jobs:
                return jobs
            left = None if end is None else end - self._clock()
            if left is not None and left <= 0:
                return []
            event = self._event(kind)
            event.clear()
            try:
                await asyncio.wait_for(event.wait(), left)
            except TimeoutError:
                return []

    def _pop(self, kind: str, max_n: int) -> list[Job]:
        pending = self._pending.get(kind)
        out: list[Job] = []
        now = self._clock()
        while pending and len(out) < max_n:
            job = pending.popleft()
            future = self._futures.get(job.id)
            if future is None or future.done():
                continue
            if job.expired(now):
                self._finish(job, exc=DeadlineExceeded("deadline passed while queued"))
                continue
            job.taken_at = now
            out.append(job)
        return out

    async def complete(self, job: Job, result: JobResult) -> None:
        self._finish(job, result=result)

    async def fail(self, job: Job, error: BaseException) -> None:
        if not isinstance(error, TokservError):
            error = ModelFailed(f"the model failed on this request: {type(error).__name__}: {error}")
        self._finish(job, exc=error)

    async def cancelled(self, jobs: Sequence[Job]) -> set[str]:
        out = set()
        for job in jobs:
            future = self._futures.get(job.id)
            if future is None or future.done():
                out.add(job.id)
        return out

    def _finish(self, job: Job, *, result: JobResult | None = None, exc: BaseException | None = None) -> None:
        future = self._futures.pop(job.id, None)
        if future is not None and not future.done():
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)  # type: ignore[arg-type]
        if job.idempotency_key is not None:
            seen = self._remembered.get(job.idempotency_key)
            if seen is not None and seen.future is future:
                if exc is not None:  # a failed job may be retried with the same key
                    del self._remembered[job.idempotency_key]
                else:
                    seen.expires_at = self._clock() + self.idempotency_ttl_s
        self._check_idle()

    # ------------------------------------------------------------------ operations
    def depths(self) -> dict[str, int]:
        return {kind: len(q) for kind, q in self._pending.items()}

    def in_flight(self) -> int:
        """Accepted jobs not finished (waiting or running)."""
        return len(self._futures)

    async def close(self) -> None:
        self._closed = True

    async def drain(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def release(self) -> None:
        for pending in self._pending.values():
            pending.clear()
        for future in list(self._futures.values()):
            if not future.done():
                future.set_exception(ShuttingDown("the server stopped before this request ran",
                                                  retry_after=self.retry_after_s))
        self._futures.clear()
        self._check_idle()

    # ------------------------------------------------------------------ helpers
    def _event(self, kind: str) -> asyncio.Event:
        event = self._events.get(kind)
        if event is None:
            event = self._events[kind] = asyncio.Event()
        return event

    def _check_idle(self) -> None:
        if not self._futures:
            self._idle.set()

    def _forget_expired(self) -> None:
        now = self._clock()
        for key in [k for k, r in self._remembered.items() if r.expires_at <= now]:
            del self._remembered[key]


def _consume(future: asyncio.Future[JobResult]) -> None:
    # Mark an exception as retrieved: a caller that gave up must not cause "exception never retrieved".
    if not future.cancelled():
        future.exception()
