"""Helpers shared by the model routes: content negotiation, reading bodies, submitting jobs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections.abc import Awaitable
from typing import Any, TypeVar

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from server.codecs import NPY, SAFETENSORS, parse_json, tensor_to_json, tensor_to_npy, tensor_to_safetensors
from server.deps import RequestOptions
from server.queue.base import Job, JobResult, Payload
from server.state import AppState

BINARY = {"schema": {"type": "string", "format": "binary"}}
T = TypeVar("T")


def schema_ref(name: str) -> dict[str, Any]:
    return {"schema": {"$ref": f"#/components/schemas/{name}"}}


def request_body(content: dict[str, Any], required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` documenting a body read by hand in several media types."""
    return {"requestBody": {"required": required, "content": content}}


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def negotiate(accept: str | None, offered: list[str]) -> str | None:
    """The offered media type the ``Accept`` header prefers (q-values honoured, first listed wins ties);
    None when the header is absent or only wildcards match."""
    if not accept:
        return None
    best: tuple[float, int, str] | None = None
    for i, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        q = 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
                if not (math.isfinite(q) and 0.0 <= q <= 1.0):
                    q = 0.0
        if media in offered and q > 0 and (best is None or q > best[0]):
            best = (q, i, media)
    return best[2] if best else None


async def read_json(request: Request) -> Any:
    """The request body as JSON (bounded: see :func:`server.codecs.parse_json`); bodies past the light
    cost are parsed in the codec pool, off the event loop."""
    body = await request.body()
    if len(body) <= 64 * 1024:
        return parse_json(body)
    return await request.app.state.tokserve.codec(parse_json, body, cost=len(body))


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.contiguous().numpy().tobytes())
            h.update(str(tuple(p.shape)).encode())
        elif isinstance(p, bytes):
            h.update(p)
        else:
            h.update(repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()


async def run_job(request: Request, state: AppState, opts: RequestOptions, model: str, payload: Payload,
                  fingerprint_parts: tuple[Any, ...]) -> JobResult:
    """Submit one job and wait for its result; timings go to the response headers."""
    queue = state.check_ready()
    scope_state = request.scope.setdefault("state", {})
    scope_state["model"] = model
    fp = fingerprint(payload.op, model, *fingerprint_parts) if opts.idempotency_key else None
    job = Job(model=model, payload=payload, request_id=opts.request_id, deadline=opts.deadline,
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


def tensor_response(t: torch.Tensor, accept: str | None, extra: dict[str, Any], name: str = "tokens") -> Response:
    """JSON tensor (default), ``.npy`` or safetensors, as ``Accept`` asks."""
    kind = negotiate(accept, ["application/json", NPY, SAFETENSORS])
    if kind == NPY:
        return Response(tensor_to_npy(t), media_type=NPY)
    if kind == SAFETENSORS:
        return Response(tensor_to_safetensors(t, name), media_type=SAFETENSORS)
    return JSONResponse({**extra, **tensor_to_json(t)})
