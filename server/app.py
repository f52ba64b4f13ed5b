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
from contextlib import asynccontextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from server.codec_pool import CodecPool
from server.engine.specs import resolve_models
from server.handlers import install_handlers
from server.metrics import Metrics, gpu_memory
from server.middleware import RequestContext
from server.playground import install_playground
from server.queue import create_queue
from server.routes import api_router
from server.schemas import (
    DecodeImagesResponse,
    DecodeJSONRequest,
    EncodeJSONRequest,
    GenerateParams,
    JobRequest,
    TensorJSON,
    V2InferRequest,
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
        log.error("the models failed to load, so the server stops: %s", state.load_error, exc_info=e)
        if state.request_exit is not None:
            state.request_exit()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.tokserve
    state.accepting = True
    state.load_error = None
    state.stopping = None
    state.codec_pool = CodecPool(state.settings.codec_threads)
    state.queue = create_queue(state.settings, state.models.queue_kinds())
    await state.queue.open()
    if not state.settings.redis_url:  # load in the background: /healthz answers meanwhile
        state._background.add(asyncio.create_task(_start_engine(state)))
    try:
        yield
    finally:
        await shutdown(state)
        if state.codec_pool is not None:
            state.codec_pool.shutdown()


async def shutdown(state: AppState) -> None:
    """Drain once (a second call waits for the first): stop accepting (new requests get 503 + Retry-After),
    let accepted work finish for up to ``shutdown_grace_s``, stop the workers, answer what is left with 503.
    Returns within the grace plus the time of one model call already running."""
    if state.stopping is None:
        state.stopping = asyncio.ensure_future(_drain(state))
    await asyncio.shield(state.stopping)


async def _drain(state: AppState) -> None:
    loop = asyncio.get_running_loop()
    grace = state.settings.shutdown_grace_s
    end = loop.time() + grace
    state.accepting = False
    queue = state.queue
    if queue is not None:
        await queue.close()
        if not await queue.drain(grace):
            log.warning("shutdown: accepted jobs did not finish within %.1f s; answering them 503", grace)
    starting = [t for t in state._background if not t.done()]
    if starting:  # still loading the models: wait for that within the grace, no longer
        await asyncio.wait(starting, timeout=max(0.0, end - loop.time()))
    if state.engine is not None:
        await state.engine.stop(timeout=max(0.0, end - loop.time()))
    if queue is not None:
        await queue.release()


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (TensorJSON, EncodeJSONRequest, DecodeJSONRequest, DecodeImagesResponse, GenerateParams,
                  JobRequest, V2InferRequest):
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
        title="tokserve", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None,
        description="Serving for 1-D image tokenizers (SoftVQ-VAE) and the SiT / DiT generators trained on them. "
                    "Contract: docs/API.md.",
    )
    app.state.tokserve = state
    install_handlers(app)
    app.include_router(api_router())
    app.add_middleware(RequestContext, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    _serve_docs(app)
    install_playground(app)
    return app


def docs_assets() -> Path:
    """Swagger UI and ReDoc, as shipped inside the ``fastapi-offline`` package (no CDN at run time)."""
    spec = find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the fastapi-offline package (the /docs and /redoc assets) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def _serve_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` with their scripts, styles and icon served from this process."""
    assets = "/docs/assets"
    app.mount(assets, StaticFiles(directory=docs_assets()), name="docs-assets")

    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{assets}/swagger-ui.css",
                                   swagger_favicon_url=f"{assets}/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no badge from the internet

    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{assets}/redoc.standalone.js",
                              redoc_favicon_url=f"{assets}/favicon.png", with_google_fonts=False)

    app.add_api_route("/docs", swagger, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
