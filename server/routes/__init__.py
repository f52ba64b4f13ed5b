"""HTTP routes: one module per family of endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import known_query, require_api_key
from server.routes import classes, decode, encode, generate, health, jobs, models, v2


def api_router() -> APIRouter:
    """All routes; the model routes (``/v1/*``, the aliases and ``/v2/models/*``) require an API key when keys
    are configured (``/v2`` and ``/v2/health/*`` stay open, as ``/healthz`` and ``/readyz``).
    Every route refuses query parameters it does not take (422)."""
    root = APIRouter()
    protected = APIRouter(dependencies=[Depends(require_api_key), Depends(known_query)])
    public = APIRouter(dependencies=[Depends(known_query)])
    for module in (encode, decode, generate, jobs, models, classes, v2):
        protected.include_router(module.router)
    public.include_router(health.router)
    public.include_router(v2.public)
    root.include_router(protected)
    root.include_router(public)
    return root
