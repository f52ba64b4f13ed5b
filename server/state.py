"""The state of one app instance (built by ``create_app``, filled by its lifespan)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.admission import Admission
from server.codec_pool import CodecPool
from server.engine.specs import ModelSet
from server.errors import NotReady, ShuttingDown
from server.metrics import Metrics
from server.queue.base import JobQueue
from server.settings import Settings


@dataclass
class AppState:
    settings: Settings
    models: ModelSet
    metrics: Metrics
    codec_pool: CodecPool | None = None
    queue: JobQueue | None = None
    engine: Any = None  # server.engine.Engine when a worker is embedded
    accepting: bool = True
    load_error: str | None = None
    admission: Admission = field(init=False)
    # Set by the command line: asks the HTTP server to exit (a fatal start-up error, a finished drain).
    request_exit: Callable[[], None] | None = None
    stopping: asyncio.Task[None] | None = None  # the drain, once shutdown has begun
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings)

    def is_ready(self) -> bool:
        return (self.accepting and self.queue is not None and self.load_error is None
                and (self.engine is None or self.engine.ready))

    def check_ready(self) -> JobQueue:
        """The queue, when requests can be accepted; else NotReady / ShuttingDown (503)."""
        retry = self.settings.retry_after_s
        if not self.accepting:
            raise ShuttingDown("the server is shutting down", retry_after=retry)
        if self.load_error is not None:  # the reason is in the server log, not here (no paths in answers)
            raise NotReady("the models failed to load; the server is stopping (see its log)", retry_after=retry)
        if self.queue is None or (self.engine is not None and not self.engine.ready):
            raise NotReady("models are loading; retry shortly", retry_after=retry)
        return self.queue

    async def codec(self, fn: Any, *args: Any, cost: float = 0, **kwargs: Any) -> Any:
        """Run CPU-bound codec work (image encode, tensor rendering) in the codec pool; ``cost`` (about bytes
        of work) above :data:`server.codec_pool.LIGHT_COST` keeps it off the light lane."""
        assert self.codec_pool is not None
        return await self.codec_pool.run(cost, fn, *args, **kwargs)
