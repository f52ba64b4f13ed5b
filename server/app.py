"""The FastAPI application factory and its lifespan.

    app = create_app(Settings())          # nothing heavy happens here: configs are read, no weights
    uvicorn.run(app)                      # lifespan: queue up, models load in the background, then ready

Startup: the queue is created and (without REDIS_URL) an embedded worker engine loads and warms up the
models in its device thread; ``/healthz`` answers at once, ``/readyz`` and the model routes answer 503 until
the engine is ready. With ``REDIS_URL`` no model is loaded here: standalone workers (``python -m server.worker``)
serve the queue, and ``/readyz`` waits for a live worker per model. Shutdown: new requests get 503, accepted
ones finish (up to ``shutdown_grace_s``), the workers stop, and anything left is answered 503 (with Redis,
jobs stay queued for the workers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.engine.specs import resolve_models
from server.handlers import install_handlers
from server.metrics import Metrics, gpu_memory
from server.middleware import RequestContext
from server.queue import create_queue
from server.routes import api_router
from server.schemas import (
    DecodeImagesResponse,
    DecodeJSONRequest,
    EncodeJSONRequest,
    GenerateParams,
    TensorJSON,
)
from server.settings import Settings
from server.state import AppState

log = logging.getLogger("tokserve.app")
VERSION = "0.1.0"


async def _start_engine(state: AppState) -> None:
    from server.engine.engine import Engine

    engine = Engine(state.settings, state.models, state.queue, state.metrics)  # type: ignore[arg-type]
    state.engine = engine
    try:
        await engine.start()
    except Exception as e:
        state.load_error = f"{type(e).__name__}: {e}"
        log.exception("the models failed to load; /readyz stays 503")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.tokserve
    state.accepting = True
    state.load_error = None
    state.codec_pool = ThreadPoolExecutor(state.settings.codec_threads, thread_name_prefix="tokserve-codec")
    state.queue = create_queue(state.settings, state.models.queue_kinds())
    await state.queue.open()
    starting: asyncio.Task[None] | None = None
    if not state.settings.redis_url:
        starting = asyncio.create_task(_start_engine(state))
    try:
        yield
    finally:
        await shutdown(state, starting)


async def shutdown(state: AppState, starting: asyncio.Task[None] | None = None) -> None:
    """Stop accepting, let accepted work finish (``shutdown_grace_s``), stop workers, answer what is left."""
    state.accepting = False
    queue = state.queue
    if queue is not None:
        await queue.close()
        if not await queue.drain(state.settings.shutdown_grace_s):
            log.warning("shutdown: accepted jobs did not finish within %.0f s", state.settings.shutdown_grace_s)
    if starting is not None and not starting.done():
        await asyncio.wait([starting])
    if state.engine is not None:
        await state.engine.stop()
    if queue is not None:
        await queue.release()
    if state.codec_pool is not None:
        state.codec_pool.shutdown(wait=False, cancel_futures=True)


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (TensorJSON, EncodeJSONRequest, DecodeJSONRequest, DecodeImagesResponse, GenerateParams):
        s = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(s.pop("$defs", {}))
        components[model.__name__] = s
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app: read the model configurations (fails fast on a bad model list), wire routes,
    middleware and error handlers. Models load in the lifespan."""
    settings = settings if settings is not None else Settings()
    models = resolve_models(settings.models, settings.default_tokenizer, settings.default_generator)
    metrics = Metrics()
    state = AppState(settings=settings, models=models, metrics=metrics)
    metrics.watch(lambda: state.queue.depths() if state.queue is not None else {}, gpu_memory)
    app = FastAPI(
        title="tokserve", version=VERSION, lifespan=lifespan,
        description="Serving for 1-D image tokenizers (SoftVQ-VAE) and the SiT / DiT generators trained on them. "
                    "Contract: docs/API.md.",
    )
    app.state.tokserve = state
    install_handlers(app)
    app.include_router(api_router())
    app.add_middleware(RequestContext, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
