"""Command line: ``tokserve serve`` (API with an embedded worker) and ``tokserve worker``.

    tokserve serve --host 0.0.0.0 --port 8000 --models softvq-tiny-64,sit-tiny-64x32 --max-batch-size 32
    python -m server --port 8000            # the same as `tokserve serve`

Flags override the ``TOKSERVE_*`` environment variables (see server/settings.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

# flag -> Settings field (None values are left to the environment)
_OVERRIDES = {
    "models": "models", "default_tokenizer": "default_tokenizer", "default_generator": "default_generator",
    "device": "device", "dtype": "dtype", "max_batch_size": "max_batch_size", "max_wait_ms": "max_wait_ms",
    "queue_capacity": "queue_capacity", "torch_threads": "torch_threads",
}


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help="comma-separated registry names and/or folders (TOKSERVE_MODELS)")
    p.add_argument("--default-tokenizer")
    p.add_argument("--default-generator")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (TOKSERVE_DEVICE)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-size", type=int, help="rows per model call; 1 disables batching")
    p.add_argument("--max-wait-ms", type=float, help="how long a partial batch waits to fill")
    p.add_argument("--queue-capacity", type=int, help="jobs waiting per (op, model) before 429")
    p.add_argument("--torch-threads", type=int)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokserve", description="tokserve: serve image tokenizers and generators")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API with an embedded worker")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    _add_settings_flags(serve)
    worker = sub.add_parser("worker", help="run a standalone worker (needs REDIS_URL)")
    _add_settings_flags(worker)
    return parser


def settings_from_args(args: argparse.Namespace) -> Any:
    from server.settings import Settings

    overrides = {field: getattr(args, flag) for flag, field in _OVERRIDES.items() if getattr(args, flag, None)
                 is not None}
    return Settings(**overrides)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# After the drain (which answers every accepted request), how long uvicorn waits for the last responses
# to be written before it closes what is left. Shutdown takes at most SHUTDOWN_GRACE_S + this (+ one model
# call already running, which cannot be interrupted).
SHUTDOWN_MARGIN_S = 1


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.serving import DrainingServer

    configure_logging(args.log_level)
    try:
        settings = settings_from_args(args)
        app = create_app(settings)
    except Exception as e:  # a bad setting or model list: one clear line, no traceback
        print(f"tokserve: cannot start: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=SHUTDOWN_MARGIN_S, access_log=False)
    server = DrainingServer(config)
    server.run()
    state = app.state.tokserve
    if state.load_error is not None:
        print(f"tokserve: the models failed to load: {state.load_error}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "serve":
        return serve(args)
    from server.worker import run

    configure_logging(args.log_level)
    try:
        settings = settings_from_args(args)
    except Exception as e:  # a bad setting: one clear line, no traceback
        print(f"tokserve worker: cannot start: {e}", file=sys.stderr)
        return 2
    return run(settings)


if __name__ == "__main__":
    raise SystemExit(main())
