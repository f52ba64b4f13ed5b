"""Helpers shared by the model routes: reading bodies, documenting them, submitting jobs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect

from server.codecs import parse_json
from server.deps import RequestOptions
from server.queue.base import Job, JobResult
from server.state import AppState
from server.validation import ValidRequest

BINARY = {"schema": {"type": "string", "format": "binary"}}
T = TypeVar("T")


def schema_ref(name: str) -> dict[str, Any]:
    return {"schema": {"$ref": f"#/components/schemas/{name}"}}


def request_body(content: dict[str, Any], required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` documenting a body read by hand in several media types."""
    return {"requestBody": {"required": required, "content": content}}


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_json(request: Request) -> Any:
    """The request body as JSON (bounded: see :func:`server.codecs.parse_json`); bodies past the light
    cost are parsed in the codec pool, off the event loop."""
    body = await request.body()
    if len(body) <= 64 * 1024:
        return parse_json(body)
    return await request.app.state.tokserve.codec(parse_json, body, cost=len(body))


async def run_job(request: Request, state: AppState, opts: RequestOptions, valid: ValidRequest) -> JobResult:
    """Submit ``valid``'s job and wait for its result; timings go to the response headers. With an
    ``Idempotency-Key`` the job is bound to the request's fingerprint."""
    queue = state.check_ready()
    scope_state = request.scope.setdefault("state", {})
    scope_state["model"] = valid.model
    payload = valid.payload()
    fp = valid.fingerprint() if opts.idempotency_key else None
    job = Job(model=valid.model, payload=payload, request_id=opts.request_id, deadline=opts.deadline,
              priority=opts.priority, idempotency_key=opts.idempotency_key, fingerprint=fp)
    result = await until_disconnect(request, queue.submit(job), op=payload.op)
    scope_state["queue_ms"] = result.queue_ms
    scope_state["compute_ms"] = result.compute_ms
    return result


async def until_disconnect(request: Request, work: Awaitable[T], op: str = "other") -> T:
    """Await ``work``; if the client disconnects first, cancel it (the queue drops the job, or a worker
    leaves it at the next step), count it in ``tokserve_cancelled_total{op, reason="client_disconnect"}`` and
    raise ClientDisconnect (no answer; counted as 499)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task  # the queue forgets the job
    state = getattr(request.app.state, "tokserve", None)
    if state is not None:
        state.metrics.cancelled.labels(op, "client_disconnect").inc()
    raise ClientDisconnect()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
