"""HTTP routes: one module per family of endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import require_api_key
from server.routes import decode, encode, generate, health, jobs, models


def api_router() -> APIRouter:
    """All routes; the model routes (``/v1/*`` and aliases) require an API key when keys are configured."""
    root = APIRouter()
    protected = APIRouter(dependencies=[Depends(require_api_key)])
    for module in (encode, decode, generate, jobs, models):
        protected.include_router(module.router)
    root.include_router(protected)
    root.include_router(health.router)
    return root
