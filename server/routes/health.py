"""GET /healthz (the process lives), GET /readyz (models loaded and warmed up), GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from server.deps import StateDep
from server.errors import NotReady
from server.metrics import CONTENT_TYPE
from server.schemas import ERROR_RESPONSES, HealthResponse

router = APIRouter()


@router.get("/healthz", response_model=HealthResponse, summary="Liveness")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=HealthResponse, responses={503: ERROR_RESPONSES[503]}, summary="Readiness")
async def readyz(state: StateDep) -> HealthResponse:
    """200 once the models are loaded and warmed up (and the queue backend can take work), else 503."""
    queue = state.check_ready()
    if not await queue.ready():
        raise NotReady("the queue backend has no live worker", retry_after=state.settings.retry_after_s)
    return HealthResponse(status="ready")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
