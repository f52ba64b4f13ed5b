"""Helpers shared by the model routes: content negotiation, reading bodies, submitting jobs."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from server.codecs import NPY, SAFETENSORS, tensor_to_json, tensor_to_npy, tensor_to_safetensors
from server.deps import RequestOptions
from server.errors import BadRequest
from server.queue.base import Job, JobResult, Payload
from server.state import AppState

BINARY = {"schema": {"type": "string", "format": "binary"}}


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
        if media in offered and q > 0 and (best is None or q > best[0]):
            best = (q, i, media)
    return best[2] if best else None


async def read_json(request: Request) -> Any:
    body = await request.body()
    if not body:
        raise BadRequest("empty JSON body")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON: {e}") from None


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
    result = await queue.submit(job)
    scope_state["queue_ms"] = result.queue_ms
    scope_state["compute_ms"] = result.compute_ms
    return result


def tensor_response(t: torch.Tensor, accept: str | None, extra: dict[str, Any], name: str = "tokens") -> Response:
    """JSON tensor (default), ``.npy`` or safetensors, as ``Accept`` asks."""
    kind = negotiate(accept, ["application/json", NPY, SAFETENSORS])
    if kind == NPY:
        return Response(tensor_to_npy(t), media_type=NPY)
    if kind == SAFETENSORS:
        return Response(tensor_to_safetensors(t, name), media_type=SAFETENSORS)
    return JSONResponse({**extra, **tensor_to_json(t)})
