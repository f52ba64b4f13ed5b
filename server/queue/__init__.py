"""Queue backends behind one interface (:class:`JobQueue`). ``create_queue(settings)`` picks one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from server.queue.base import (
    OPS,
    DecodePayload,
    EncodePayload,
    GeneratePayload,
    Job,
    JobQueue,
    JobResult,
    Payload,
    job_kind,
)
from server.queue.memory import InProcessQueue

if TYPE_CHECKING:
    from server.settings import Settings


def create_queue(settings: Settings, kinds: Sequence[str] = ()) -> JobQueue:
    """The backend selected by the settings: Redis Streams when ``REDIS_URL`` is set, else in-process.
    ``kinds``: what an API process serves (with Redis, /readyz waits for a live worker serving each)."""
    if settings.redis_url:
        from server.queue.redis import RedisOptions, RedisQueue

        return RedisQueue(RedisOptions.from_settings(settings), kinds)
    return InProcessQueue(settings.queue_capacity, idempotency_ttl_s=settings.idempotency_ttl_s,
                          retry_after_s=settings.retry_after_s, job_ttl_s=settings.job_ttl_s)


__all__ = [
    "OPS",
    "DecodePayload",
    "EncodePayload",
    "GeneratePayload",
    "InProcessQueue",
    "Job",
    "JobQueue",
    "JobResult",
    "Payload",
    "create_queue",
    "job_kind",
]
