"""The in-process queue backend (default): asyncio, API and worker in one process and one event loop."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from server.errors import (
    DeadlineExceeded,
    InvalidValue,
    ModelFailed,
    QueueFull,
    ShuttingDown,
    TokservError,
    to_wire,
)
from server.queue.base import (
    TERMINAL,
    Job,
    JobEvent,
    JobInfo,
    JobQueue,
    JobResult,
    JobState,
    LocalIdleMixin,
    Progress,
)

MAX_IDEMPOTENCY_ENTRIES = 4096
MAX_FINISHED_RECORDS = 256  # finished tracked jobs kept (with their results) beyond which the oldest go


@dataclass
class _Remembered:
    fingerprint: str | None
    future: asyncio.Future[JobResult]
    job_id: str
    expires_at: float = float("inf")  # set when the job finishes


@dataclass(kw_only=True)
class _Record(JobState):
    """A tracked (jobs API) job: its :class:`JobState`, its event log, and its result once completed."""

    job: Job
    events: list[JobEvent] = field(default_factory=list)
    signal: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) on every new event


class _Lanes:
    """The waiting jobs of one kind: one FIFO per priority, the highest priority first."""

    def __init__(self) -> None:
        self._by_priority: dict[int, deque[Job]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_priority.values())

    def append(self, job: Job) -> None:
        self._by_priority.setdefault(job.priority, deque()).append(job)

    def remove(self, job: Job) -> None:
        lane = self._by_priority.get(job.priority)
        if lane is not None:
            try:
                lane.remove(job)
            except ValueError:
                pass

    def popleft(self) -> Job | None:
        for priority in sorted(self._by_priority, reverse=True):
            lane = self._by_priority[priority]
            if lane:
                return lane.popleft()
        return None

    def clear(self) -> None:
        self._by_priority.clear()


class InProcessQueue(LocalIdleMixin, JobQueue):
    """Bounded queue per kind, highest priority first, FIFO within a priority. ``capacity`` bounds the jobs
    *waiting* per kind (not yet taken): a full kind answers QueueFull at once. ``clock`` gives wall-clock
    seconds (deadlines are wall-clock). Tracked jobs keep their state, events and result for ``job_ttl_s``
    after they finish."""

    def __init__(self, capacity: int, *, idempotency_ttl_s: float = 600.0, retry_after_s: float = 1.0,
                 job_ttl_s: float = 3600.0, clock: Callable[[], float] = time.time) -> None:
        self.capacity = capacity
        self.idempotency_ttl_s = idempotency_ttl_s
        self.retry_after_s = retry_after_s
        self.job_ttl_s = job_ttl_s
        self._clock = clock
        self._pending: dict[str, _Lanes] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._futures: dict[str, asyncio.Future[JobResult]] = {}  # every accepted, unfinished job
        self._remembered: OrderedDict[str, _Remembered] = OrderedDict()
        self._records: OrderedDict[str, _Record] = OrderedDict()  # tracked jobs
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    # ------------------------------------------------------------------ API side
    async def submit(self, job: Job) -> JobResult:
        future, new = self._accept(job)
        if not new:
            return await self._wait(future, job.deadline)
        try:
            return await self._wait(future, job.deadline)
        except (DeadlineExceeded, asyncio.CancelledError):
            self._abandon(job)
            raise

    async def enqueue(self, job: Job) -> str:
        job.tracked = True
        future, new = self._accept(job)
        if new:
            return job.id
        seen = self._remembered[job.idempotency_key or ""]
        return seen.job_id

    def _accept(self, job: Job) -> tuple[asyncio.Future[JobResult], bool]:
        """Queue ``job`` (or find the job its idempotency key names): (its future, whether it is new)."""
        if self._closed:
            raise ShuttingDown("the server is shutting down", retry_after=self.retry_after_s)
        if job.idempotency_key is not None:
            self._forget_expired()
            seen = self._remembered.get(job.idempotency_key)
            if seen is not None:
                if seen.fingerprint != job.fingerprint:
                    raise InvalidValue("Idempotency-Key was already used with a different request")
                return seen.future, False
        pending = self._pending.setdefault(job.kind, _Lanes())
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
            self._remembered[job.idempotency_key] = _Remembered(job.fingerprint, future, job.id)
            while len(self._remembered) > MAX_IDEMPOTENCY_ENTRIES:
                self._remembered.popitem(last=False)
        if job.tracked:
            self._forget_expired()
            record = self._records[job.id] = _Record(job=job)
            self._emit(record, "queued", priority=job.priority)
        pending.append(job)
        self._event(job.kind).set()
        return future, True

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
            pending.remove(job)
        future = self._futures.pop(job.id, None)
        if future is not None and not future.done():
            future.cancel()
        self._forget_key(job, future)
        self._check_idle()

    # ------------------------------------------------------------------ jobs API
    async def info(self, job_id: str) -> JobInfo | None:
        self._forget_expired()
        record = self._records.get(job_id)
        return None if record is None else _info(record)

    async def events(self, job_id: str, after: str | None, timeout: float) -> list[JobEvent] | None:
        record = self._records.get(job_id)
        if record is None:
            return None
        start = _event_index(after)
        if start >= len(record.events) and timeout > 0 and record.status not in TERMINAL:
            try:
                await asyncio.wait_for(record.signal.wait(), timeout)
            except TimeoutError:
                pass
        return record.events[start:]

    async def cancel(self, job_id: str) -> JobInfo | None:
        record = self._records.get(job_id)
        if record is None:
            return None
        if record.status in TERMINAL:
            return _info(record)
        job = record.job
        pending = self._pending.get(job.kind)
        if pending is not None:
            pending.remove(job)
        future = self._futures.pop(job.id, None)
        if future is not None and not future.done():
            future.set_exception(DeadlineExceeded("the job was cancelled"))
        self._forget_key(job, future)
        record.status = "cancelled"
        record.finished_at = self._clock()
        self._emit(record, "cancelled", step=record.step, steps=record.steps)
        self._check_idle()
        return _info(record)

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
            if job is None:
                break
            future = self._futures.get(job.id)
            if future is None or future.done():
                continue
            if job.expired(now):
                self._finish(job, exc=DeadlineExceeded("deadline passed while queued"))
                continue
            job.taken_at = now
            record = self._records.get(job.id)
            if record is not None:
                record.status = "running"
                record.started_at = now
                record.deliveries += 1
                self._emit(record, "started", delivery=record.deliveries)
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

    async def progress(self, updates: Sequence[Progress]) -> None:
        for u in updates:
            record = self._records.get(u.job.id) if u.job.tracked else None
            if record is not None and record.status == "running":
                record.step, record.steps = u.step, u.total
                self._emit(record, "step", step=u.step, steps=u.total)

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
        record = self._records.get(job.id)
        if record is not None and record.status not in TERMINAL:
            record.finished_at = self._clock()
            if exc is not None:
                record.status, record.error = "failed", to_wire(exc)
                self._emit(record, "failed", error=record.error)
            else:
                record.status, record.result = "completed", result
                self._emit(record, "completed")
        self._check_idle()

    # ------------------------------------------------------------------ operations
    def depths(self) -> dict[str, int]:
        return {kind: len(q) for kind, q in self._pending.items()}

    def in_flight(self) -> int:
        """Accepted jobs not finished (waiting or running)."""
        return len(self._futures)

    async def release(self) -> None:
        for pending in self._pending.values():
            pending.clear()
        for job_id, future in list(self._futures.items()):
            record = self._records.get(job_id)
            if record is not None:
                self._finish(record.job, exc=ShuttingDown("the server stopped before this job ran",
                                                          retry_after=self.retry_after_s))
            elif not future.done():
                future.set_exception(ShuttingDown("the server stopped before this request ran",
                                                  retry_after=self.retry_after_s))
        self._futures.clear()
        self._check_idle()

    # ------------------------------------------------------------------ helpers
    def _emit(self, record: _Record, type_: str, **data: object) -> None:
        data = {"job": record.job.id, "status": record.status, "time": self._clock(), **data}
        record.events.append(JobEvent(str(len(record.events) + 1), type_, data))
        record.signal.set()
        record.signal = asyncio.Event()

    def _event(self, kind: str) -> asyncio.Event:
        event = self._events.get(kind)
        if event is None:
            event = self._events[kind] = asyncio.Event()
        return event

    def _check_idle(self) -> None:
        if not self._futures:
            self._idle.set()

    def _forget_key(self, job: Job, future: asyncio.Future[JobResult] | None) -> None:
        if job.idempotency_key is not None:
            seen = self._remembered.get(job.idempotency_key)
            if seen is not None and seen.future is future:
                del self._remembered[job.idempotency_key]

    def _forget_expired(self) -> None:
        now = self._clock()
        for key in [k for k, r in self._remembered.items() if r.expires_at <= now]:
            del self._remembered[key]
        finished = [i for i, r in self._records.items() if r.finished_at is not None]
        for i in finished[:max(0, len(finished) - MAX_FINISHED_RECORDS)]:
            del self._records[i]
        for i in finished:
            r = self._records.get(i)
            if r is not None and r.finished_at is not None and r.finished_at + self.job_ttl_s <= now:
                del self._records[i]


def _event_index(after: str | None) -> int:
    """In-process event ids are 1, 2, 3 ...: the index of the first event after ``after``."""
    if not after:
        return 0
    try:
        return max(0, int(after))
    except ValueError:
        return 0


def _info(r: _Record) -> JobInfo:
    return JobInfo.of(r.job, r)


def _consume(future: asyncio.Future[JobResult]) -> None:
    # Mark an exception as retrieved: a caller that gave up must not cause "exception never retrieved".
    if not future.cancelled():
        future.exception()
