"""Pure ASGI middleware around every HTTP request: request id, timing headers, body-size limit, request
metrics, and a JSON 500 (with the request id) for anything unexpected.

Routes report their queue / compute time and model through ``scope["state"]`` (``request.state``):
``queue_ms``, ``compute_ms``, ``model``; this layer turns them into ``x-queue-time`` / ``x-compute-time`` /
``x-model``. A route whose operation is not the last part of its path (``POST /v2/models/{name}/infer``) names
it in ``op`` (encode, decode, generate) for the metrics.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import PayloadTooLarge, error_body, is_v2, v2_error_body
from server.metrics import Metrics

log = logging.getLogger("tokserve.http")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_OPS = {"encode", "decode", "generate", "models", "healthz", "readyz", "metrics"}
CLIENT_CLOSED = 499  # the metrics' status of a request whose client disconnected before its answer


def op_of(path: str) -> str:
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return last if last in _OPS else "other"


class RequestContext:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = rid
        path = scope.get("path", "")
        op = op_of(path)
        v2 = is_v2(path)
        started = {"status": 0}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                started["status"] = message["status"]
                h = MutableHeaders(scope=message)
                h["x-request-id"] = rid
                h["x-queue-time"] = f"{state.get('queue_ms', 0.0):.3f}"
                h["x-compute-time"] = f"{state.get('compute_ms', 0.0):.3f}"
                h["x-total-time"] = f"{1e3 * (time.perf_counter() - t0):.3f}"
                if state.get("model"):  # the model that served it (binary answers carry no JSON model field)
                    h["x-model"] = state["model"]
            await send(message)

        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            length = 0
        try:
            if length > self.max_body_bytes:
                await self._error(send_with_headers, 413, "payload_too_large",
                                  f"body of {length} bytes; the limit is {self.max_body_bytes}", rid, v2)
            else:
                await self.app(scope, self._limited(receive), send_with_headers)
        except ClientDisconnect:  # the client went away mid-request: nobody to answer, not a server error
            log.info("request %s: the client disconnected", rid)
            started["status"] = started["status"] or CLIENT_CLOSED
        except Exception as e:  # a bug: answer 500 with the request id, never crash the process
            log.exception("request %s: unhandled %s", rid, type(e).__name__)
            if not started["status"]:
                await self._error(send_with_headers, 500, "internal_error", f"internal error ({type(e).__name__})",
                                  rid, v2)
        finally:
            status = str(started["status"] or 500)
            op = state.get("op") or op
            self.metrics.requests.labels(op, status).inc()
            if op in ("encode", "decode", "generate"):
                model = state.get("model", "")
                self.metrics.request_seconds.labels(op, model).observe(time.perf_counter() - t0)

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body_bytes

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
            return message

        return limited

    @staticmethod
    async def _error(send: Send, status: int, type_: str, message: str, rid: str, v2: bool = False) -> None:
        body = json.dumps(v2_error_body(message) if v2 else error_body(type_, message, rid)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
