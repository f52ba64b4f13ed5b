"""``python -m server.worker``: a standalone worker process (one per device).

It loads the configured models, pulls jobs from the queue backend, and runs them, exactly as the worker
embedded in ``python -m server`` does. A standalone worker needs a queue shared between processes: the Redis
Streams backend (``REDIS_URL``). Once its models are loaded and warmed up it announces itself and the kinds it
serves (a heartbeat key with a TTL, read by the API's ``/readyz``). ``TOKSERVE_METRICS_PORT`` serves its
Prometheus metrics. On SIGTERM / SIGINT it stops taking jobs, finishes what it holds (up to
``TOKSERVE_SHUTDOWN_GRACE_S``) and hands the rest back to the queue for another worker.

With the in-process queue (no REDIS_URL) only the API process itself can serve its queue, so this command
explains that and exits with status 2.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from server.settings import Settings

if TYPE_CHECKING:
    from server.queue.base import JobQueue

log = logging.getLogger("tokserve.worker")

NO_REDIS = (
    "tokserve worker: no REDIS_URL is set. With the default in-process queue, the worker runs embedded in the API "
    "process: start `python -m server` (or `tokserve serve`) instead. Standalone workers need the Redis Streams "
    "backend: set REDIS_URL=redis://host:6379/0."
)


async def run_worker(settings: Settings, queue: JobQueue | None = None,
                     stop: asyncio.Event | None = None) -> None:
    """Serve ``settings.models`` from ``queue`` (default: the configured backend) until ``stop`` is set
    (default: SIGTERM / SIGINT); then finish what is held and hand the rest back."""
    from server.engine.engine import Engine
    from server.engine.specs import resolve_models
    from server.metrics import Metrics, gpu_memory
    from server.queue import create_queue

    models = resolve_models(settings.models, settings.default_tokenizer, settings.default_generator)
    q = queue if queue is not None else create_queue(settings)
    await q.open()
    metrics = Metrics()
    metrics.watch(q.depths, gpu_memory)
    http = None
    if settings.metrics_port:
        from prometheus_client import start_http_server

        http = start_http_server(settings.metrics_port, registry=metrics.registry)
        log.info("worker metrics on :%d/metrics", settings.metrics_port)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    engine = Engine(settings, models, q, metrics)
    try:
        await engine.start()
        kinds = [loop.kind for loop in engine.loops]
        await q.announce(kinds, {"host": socket.gethostname(), "pid": os.getpid(), "device": settings.device,
                                 "models": list(models.specs), "metrics_port": settings.metrics_port})
        log.info("worker serving %s", ", ".join(kinds))
        await stop.wait()
        log.info("worker stopping: finishing held jobs (up to %.0f s), then handing the rest back",
                 settings.shutdown_grace_s)
    finally:
        await engine.stop(timeout=settings.shutdown_grace_s)
        await q.release()
        if http is not None and isinstance(http, tuple):
            http[0].shutdown()


def run(settings: Settings) -> int:
    if not settings.redis_url:
        print(NO_REDIS, file=sys.stderr)
        return 2
    from server.engine.specs import resolve_models

    try:
        resolve_models(settings.models, settings.default_tokenizer, settings.default_generator)
    except Exception as e:  # a bad model list: one clear line, no traceback
        print(f"tokserve worker: cannot start: {e}", file=sys.stderr)
        return 2
    asyncio.run(run_worker(settings))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from server.cli import main as cli_main

    return cli_main(["worker", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
