"""The queue interface between the API (which never runs a model) and the workers (which own a device).

API side: ``await queue.submit(job) -> JobResult`` (raises QueueFull, DeadlineExceeded, ShuttingDown, or the
job's own error). Worker side: ``await queue.take(kind, max_n, timeout) -> [Job]``, then
``complete(job, result)`` or ``fail(job, error)`` for each. A *kind* is ``"<op>:<model>"`` (one stream per
model and operation in the Redis backend). Jobs, payloads, results and errors are plain data (tensors, numbers,
strings; see ``server.queue.wire``) so any backend can carry them between processes and machines.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from models.sampling.base import SampleRequest

OPS = ("encode", "decode", "generate")


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


class JobQueue(ABC):
    """A queue backend. The engine and the routes only ever see this interface."""

    # ------------------------------------------------------------------ API side
    @abstractmethod
    async def submit(self, job: Job) -> JobResult:
        """Enqueue ``job`` and wait for its result (until ``job.deadline``). A job with an idempotency key
        already seen (same fingerprint) is not run again: the first one's result is returned."""

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
        """Ids of those taken ``jobs`` whose caller gave up (deadline, cancel): the worker drops them."""
        return set()

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
    "DecodePayload",
    "EncodePayload",
    "GeneratePayload",
    "Job",
    "JobQueue",
    "JobResult",
    "Payload",
    "job_kind",
]
