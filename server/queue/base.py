"""The queue interface between the API (which never runs a model) and the workers (which own a device).

API side: ``await queue.submit(job) -> JobResult`` (raises QueueFull, DeadlineExceeded, ShuttingDown,
BackendUnavailable, or the job's own error). Jobs API (long work, ``tracked`` jobs): ``enqueue(job) -> id``,
``info(id)``, ``events(id, after, timeout)``, ``cancel(id)``. Worker side: ``await queue.take(kind, max_n,
timeout) -> [Job]``, then ``complete(job, result)`` or ``fail(job, error)`` for each (``progress`` reports
denoising steps, ``hand_back`` returns a job a stopping worker did not finish). A *kind* is
``"<op>:<model>"`` (one stream per model and operation in the Redis backend). Jobs, payloads, results and errors
are plain data (tensors, numbers, strings; see ``server.queue.wire``) so any backend can carry them between
processes and machines.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from models.sampling.base import SampleRequest

OPS = ("encode", "decode", "generate")
# Job states (jobs API). A job moves queued -> running -> one terminal state (running -> queued again when a
# worker hands it back or a delivery failed and is retried).
STATES = ("queued", "running", "completed", "failed", "cancelled")
TERMINAL = frozenset({"completed", "failed", "cancelled"})
PRIORITY_RANGE = (-100, 100)  # higher runs sooner; 0 is the default


def job_kind(op: str, model: str) -> str:
    """The queue kind of ``op`` on ``model``: ``"encode:softvq-tiny-64"``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    return f"{op}:{model}"


@dataclass(eq=False)
class EncodePayload:
    """Images to tokenize: ``images`` (B, 3, H, W) float32 in [-1, 1], already at the tokenizer's size."""

    images: torch.Tensor
    op: ClassVar[str] = "encode"

    @property
    def rows(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape_key(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])


@dataclass(eq=False)
class DecodePayload:
    """Tokens to decode: ``tokens`` (B, L, D) float32 (un-normalised tokenizer space), validated."""

    tokens: torch.Tensor
    op: ClassVar[str] = "decode"

    @property
    def rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def shape_key(self) -> tuple[int, ...]:
        return tuple(self.tokens.shape[1:])


@dataclass
class GeneratePayload:
    """One :class:`SampleRequest` per image (each with its own seed, class, scale, interval, steps)."""

    requests: list[SampleRequest]
    return_latents: bool = False
    op: ClassVar[str] = "generate"

    @property
    def rows(self) -> int:
        return len(self.requests)

    @property
    def shape_key(self) -> tuple[int, ...]:
        return ()


Payload = EncodePayload | DecodePayload | GeneratePayload


@dataclass(eq=False)
class Job:
    """One request's work (compared by identity). Times are wall-clock epoch seconds (comparable across
    machines)."""

    model: str
    payload: Payload
    request_id: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    submitted_at: float = field(default_factory=time.time)
    deadline: float | None = None
    idempotency_key: str | None = None
    fingerprint: str | None = None  # hash of the validated request, checked with idempotency_key
    taken_at: float | None = None
    priority: int = 0  # higher is taken (and joins a running generation batch) sooner
    tracked: bool = False  # a jobs-API job: status, events and result are kept for GET /v1/jobs/{id}
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able: what renders the result (jobs API)

    @property
    def op(self) -> str:
        return self.payload.op

    @property
    def kind(self) -> str:
        return job_kind(self.op, self.model)

    @property
    def rows(self) -> int:
        return self.payload.rows

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (time.time() if now is None else now) >= self.deadline


@dataclass(eq=False)
class JobResult:
    """What a worker returns. ``tensors``: encode ``tokens`` (B, L, D); decode ``images`` (B, 3, H, W)
    float32 unclamped; generate ``images`` (B, 3, H, W) and, on request, ``latents`` (B, L, D) un-normalised
    tokens. Times in milliseconds: waiting in the queue, and running (batch or denoising loop + decode)."""

    tensors: dict[str, torch.Tensor]
    queue_ms: float = 0.0
    compute_ms: float = 0.0


@dataclass(frozen=True)
class JobEvent:
    """One entry of a tracked job's event log (``GET /v1/jobs/{id}/events``). ``id`` orders the events of
    one job and is what a client sends back as ``Last-Event-ID`` (opaque: a sequence number in-process, a
    stream id in Redis). ``type``: queued, started, step, completed, failed, cancelled."""

    id: str
    type: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL


@dataclass
class JobState:
    """The part of a job's record that changes while it runs, kept by every backend: ``status``, times in
    epoch seconds, ``step`` of ``steps`` (the slowest row's progress; generation only), how often it was
    delivered to a worker, ``error`` (``{"type", "message"}``) once failed and ``result`` once completed."""

    status: str = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    step: int | None = None
    steps: int | None = None
    deliveries: int = 0
    error: dict[str, str] | None = None
    result: JobResult | None = None


@dataclass(kw_only=True)
class JobInfo(JobState):
    """What ``GET /v1/jobs/{id}`` reports: the job's identity and request fields plus its :class:`JobState`
    (``result`` until it expires)."""

    id: str
    op: str
    model: str
    request_id: str
    priority: int
    submitted_at: float
    deadline: float | None
    meta: dict[str, Any]

    @classmethod
    def of(cls, job: Job, state: JobState) -> JobInfo:
        """A report of ``job`` in ``state``."""
        return cls(id=job.id, op=job.op, model=job.model, request_id=job.request_id, priority=job.priority,
                   submitted_at=job.submitted_at, deadline=job.deadline, meta=job.meta,
                   **{f.name: getattr(state, f.name) for f in fields(JobState)})


@dataclass(frozen=True)
class Progress:
    """A worker's report: ``job`` has done ``step`` of ``total`` denoising steps."""

    job: Job
    step: int
    total: int


class JobQueue(ABC):
    """A queue backend. The engine and the routes only ever see this interface."""

    # ------------------------------------------------------------------ API side
    async def open(self) -> None:
        """Connect and start background work (Redis: heartbeats, reclaiming, trimming). Called once, in the
        running event loop, before any other method."""
        return None

    @abstractmethod
    async def submit(self, job: Job) -> JobResult:
        """Enqueue ``job`` and wait for its result (until ``job.deadline``). A job with an idempotency key
        already seen (same fingerprint) is not run again: the first one's result is returned."""

    # ------------------------------------------------------------------ jobs API (tracked jobs)
    @abstractmethod
    async def enqueue(self, job: Job) -> str:
        """Accept ``job`` (``tracked``) without waiting; returns its id. With an idempotency key already seen
        (same fingerprint) nothing new runs and the first job's id is returned."""

    @abstractmethod
    async def info(self, job_id: str) -> JobInfo | None:
        """The state of a tracked job (with its result once completed); None when unknown or expired."""

    @abstractmethod
    async def events(self, job_id: str, after: str | None, timeout: float) -> list[JobEvent] | None:
        """The job's events after event id ``after`` (all when None), waiting up to ``timeout`` seconds for at
        least one; ``[]`` on timeout, None when the job is unknown or expired."""

    @abstractmethod
    async def cancel(self, job_id: str) -> JobInfo | None:
        """Cancel a tracked job: a queued job never runs, a running generation leaves its batch at the next
        step (its rows are freed). A finished job is left as it is. Returns the state after, None if
        unknown."""

    def valid_event_id(self, event_id: str) -> bool:
        """Whether ``event_id`` (a client's ``Last-Event-ID``) has the form of this backend's event ids
        (in-process: 1, 2, 3 ...); the route refuses anything else with 422."""
        return bool(re.fullmatch(r"[0-9]{1,18}", event_id))

    # ------------------------------------------------------------------ worker side
    @abstractmethod
    async def take(self, kind: str, max_n: int, timeout: float | None) -> list[Job]:
        """Up to ``max_n`` jobs of ``kind`` (FIFO), waiting up to ``timeout`` seconds (None: forever) for the
        first one; returns ``[]`` on timeout. Expired or cancelled jobs are never returned."""

    @abstractmethod
    async def complete(self, job: Job, result: JobResult) -> None: ...

    @abstractmethod
    async def fail(self, job: Job, error: BaseException) -> None: ...

    async def cancelled(self, jobs: Sequence[Job]) -> set[str]:
        """Ids of those taken ``jobs`` whose caller gave up (deadline, cancel): the worker forgets them (the
        backend counts them as finished)."""
        return set()

    async def progress(self, updates: Sequence[Progress]) -> None:
        """Record denoising progress (``step`` events of tracked jobs). Best effort."""
        return None

    async def hand_back(self, job: Job) -> None:
        """A stopping worker did not finish ``job``. In-process it answers 503; a durable backend queues it
        again for another worker."""
        from server.errors import ShuttingDown

        await self.fail(job, ShuttingDown("the worker stopped before this job finished"))

    async def announce(self, kinds: Sequence[str], info: dict[str, Any]) -> None:
        """A worker is ready to serve ``kinds``: advertise it (Redis: a heartbeat key the API's /readyz reads)
        until :meth:`release`."""
        return None

    # ------------------------------------------------------------------ operations
    @abstractmethod
    def depths(self) -> dict[str, int]:
        """Jobs waiting (not yet taken) per kind."""

    async def ready(self) -> bool:
        """Whether the backend can accept work (Redis: reachable, with a live worker)."""
        return True

    @abstractmethod
    async def close(self) -> None:
        """Stop accepting: later ``submit`` calls raise ShuttingDown. Accepted jobs still run."""

    @abstractmethod
    async def drain(self, timeout: float) -> bool:
        """Wait until every accepted job has finished; False if ``timeout`` passed first."""

    async def release(self) -> None:
        """After the local workers stopped: hand back accepted jobs that did not finish (in-process they
        answer 503; a durable backend leaves them for another worker)."""
        return None


__all__ = [
    "OPS",
    "PRIORITY_RANGE",
    "STATES",
    "TERMINAL",
    "DecodePayload",
    "EncodePayload",
    "GeneratePayload",
    "Job",
    "JobEvent",
    "JobInfo",
    "JobQueue",
    "JobResult",
    "Payload",
    "Progress",
    "job_kind",
]


class LocalIdleMixin:
    """``close`` and ``drain`` of a backend that counts this process's accepted, unfinished work itself:
    ``_closed`` refuses new submissions, ``_idle`` is set whenever that count is zero. Listed before
    :class:`JobQueue` in the bases."""

    _closed: bool
    _idle: asyncio.Event

    async def close(self) -> None:
        self._closed = True

    async def drain(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False
