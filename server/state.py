"""The state of one app instance (built by ``create_app``, filled by its lifespan)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

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
    codec_pool: ThreadPoolExecutor | None = None
    queue: JobQueue | None = None
    engine: Any = None  # server.engine.Engine when a worker is embedded
    accepting: bool = True
    load_error: str | None = None
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    def is_ready(self) -> bool:
        return (self.accepting and self.queue is not None and self.load_error is None
                and (self.engine is None or self.engine.ready))

    def check_ready(self) -> JobQueue:
        """The queue, when requests can be accepted; else NotReady / ShuttingDown (503)."""
        retry = self.settings.retry_after_s
        if not self.accepting:
            raise ShuttingDown("the server is shutting down", retry_after=retry)
        if self.load_error is not None:
            raise NotReady(f"models failed to load: {self.load_error}", retry_after=retry)
        if self.queue is None or (self.engine is not None and not self.engine.ready):
            raise NotReady("models are loading; retry shortly", retry_after=retry)
        return self.queue

    async def codec(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run CPU-bound codec work (image decode/encode, tensor parsing) in the codec pool."""
        return await asyncio.get_running_loop().run_in_executor(self.codec_pool, partial(fn, *args, **kwargs))
