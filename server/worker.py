"""``python -m server.worker``: a standalone worker process (one per device).

It loads the configured models, pulls jobs from the queue backend, and runs them, exactly as the worker
embedded in ``python -m server`` does. A standalone worker needs a queue shared between processes: the Redis
Streams backend (``REDIS_URL``, issue 8). With the in-process queue (no REDIS_URL) only the API process itself
can serve its queue, so this command explains that and exits with status 2.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from server.settings import Settings

log = logging.getLogger("tokserve.worker")

NO_REDIS = (
    "tokserve worker: no REDIS_URL is set. With the default in-process queue, the worker runs embedded in the API "
    "process: start `python -m server` (or `tokserve serve`) instead. Standalone workers need the Redis Streams "
    "backend: set REDIS_URL=redis://host:6379/0."
)


async def run_worker(settings: Settings, queue: object | None = None) -> None:
    """Serve ``settings.models`` from ``queue`` (default: the configured backend) until SIGTERM / SIGINT; then
    finish what is held and hand the rest back."""
    from server.engine.engine import Engine
    from server.engine.specs import resolve_models
    from server.metrics import Metrics
    from server.queue import JobQueue, create_queue

    models = resolve_models(settings.models, settings.default_tokenizer, settings.default_generator)
    q = queue if isinstance(queue, JobQueue) else create_queue(settings)
    engine = Engine(settings, models, q, Metrics())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await engine.start()
    log.info("worker serving %s", ", ".join(models.specs))
    await stop.wait()
    await engine.stop(timeout=settings.shutdown_grace_s)
    await q.release()


def run(settings: Settings) -> int:
    if not settings.redis_url:
        print(NO_REDIS, file=sys.stderr)
        return 2
    try:
        asyncio.run(run_worker(settings))
    except NotImplementedError as e:
        print(f"tokserve worker: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from server.cli import main as cli_main

    return cli_main(["worker", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
