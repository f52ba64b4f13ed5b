"""HTTP routes: one module per family of endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import known_query, require_api_key
from server.routes import classes, decode, encode, generate, health, jobs, models


def api_router() -> APIRouter:
    """All routes; the model routes (``/v1/*`` and aliases) require an API key when keys are configured.
    Every route refuses query parameters it does not take (422)."""
    root = APIRouter()
    protected = APIRouter(dependencies=[Depends(require_api_key), Depends(known_query)])
    public = APIRouter(dependencies=[Depends(known_query)])
    for module in (encode, decode, generate, jobs, models, classes):
        protected.include_router(module.router)
    public.include_router(health.router)
    root.include_router(protected)
    root.include_router(public)
    return root
