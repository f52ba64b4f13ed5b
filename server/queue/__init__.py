"""Queue backends behind one interface (:class:`JobQueue`). ``create_queue(settings)`` picks one."""

from __future__ import annotations

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


def create_queue(settings: Settings) -> JobQueue:
    """The backend selected by the settings: Redis Streams when ``REDIS_URL`` is set, else in-process."""
    if settings.redis_url:
        raise NotImplementedError(
            "REDIS_URL is set but the Redis Streams backend is not built yet (issue 8); unset REDIS_URL to "
            "use the in-process queue"
        )
    return InProcessQueue(settings.queue_capacity, idempotency_ttl_s=settings.idempotency_ttl_s,
                          retry_after_s=settings.retry_after_s)


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
