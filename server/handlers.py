"""Exception handlers: every error leaves as the JSON body of docs/API.md, with its status from the one
table in :mod:`server.errors`, the request id, and ``Retry-After`` on 429 / 503. Under ``/v2`` (the Open
Inference Protocol) the body is the protocol's ``{"error": "<message>"}``, with the same status and headers."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import RETRY_STATUSES, TokservError, error_body, is_v2, status_of, v2_error_body

log = logging.getLogger("tokserve.errors")

_HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_value"}


def request_id_of(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def error_response(status: int, type_: str, message: str, request_id: str,
                   retry_after: float | None = None, headers: dict[str, str] | None = None,
                   v2: bool = False) -> JSONResponse:
    headers = dict(headers or {})
    if status in RETRY_STATUSES:
        headers["Retry-After"] = str(max(0, math.ceil(retry_after if retry_after is not None else 1)))
    # Messages may quote client text: lone surrogates (valid in JSON strings) cannot be UTF-8 encoded
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = v2_error_body(message) if v2 else error_body(type_, message, request_id)
    return JSONResponse(body, status_code=status, headers=headers)


async def _tokserv_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TokservError)
    status = status_of(exc)
    if status == 500:
        log.warning("request %s: %s %s", request_id_of(request), status, exc.message)
    return error_response(status, exc.type, exc.message, request_id_of(request), exc.retry_after,
                          v2=is_v2(request.url.path))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid_value", describe_validation(exc.errors()), request_id_of(request),
                          v2=is_v2(request.url.path))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_ = _HTTP_TYPES.get(exc.status_code, "internal_error" if exc.status_code >= 500 else "bad_request")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {(exc.headers or {}).get('Allow', '')}"
    return error_response(exc.status_code, type_, message, request_id_of(request), headers=exc.headers,
                          v2=is_v2(request.url.path))


def describe_validation(errors: list[dict] | tuple) -> str:  # type: ignore[type-arg]
    """Pydantic errors -> one readable line: ``cfg_scale: Input should be a valid number; ...``."""
    parts = []
    for e in list(errors)[:8]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TokservError, _tokserv_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
