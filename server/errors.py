"""Every error the server answers with, and the ONE table that maps them to HTTP statuses.

Errors are plain exceptions (no HTTP imports) so the queue and the workers raise the same ones; a job error
travels through any queue backend as ``{"type", "message"}`` (:func:`to_wire` / :func:`from_wire`) and is
raised again on the API side. ``server.handlers`` turns them into the JSON body of docs/API.md.
"""

from __future__ import annotations

from typing import Any


class TokservError(Exception):
    """Base of all answered errors. ``type`` is the machine-readable kind in the JSON body."""

    type = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(TokservError):
    """Undecodable or truncated image, malformed body or tensor file."""

    type = "bad_request"


class Unauthorized(TokservError):
    type = "unauthorized"


class NotFound(TokservError):
    """Unknown model or route."""

    type = "not_found"


class PayloadTooLarge(TokservError):
    """Body over ``max_body_bytes``, image over ``max_image_pixels`` or a decompression bomb."""

    type = "payload_too_large"


class UnsupportedMediaType(TokservError):
    type = "unsupported_media_type"


class InvalidValue(TokservError):
    """Valid syntax, invalid values: token shape/dtype, NaN/inf, class out of range, bad parameter."""

    type = "invalid_value"


class QueueFull(TokservError):
    type = "queue_full"


class ModelFailed(TokservError):
    """The model raised on this request (the other requests of its batch are unaffected)."""

    type = "model_error"


class InternalError(TokservError):
    type = "internal_error"


class NotReady(TokservError):
    type = "not_ready"


class ShuttingDown(TokservError):
    type = "shutting_down"


class BackendUnavailable(TokservError):
    """The queue backend (e.g. Redis) cannot be reached."""

    type = "backend_unavailable"


class DeadlineExceeded(TokservError):
    type = "deadline_exceeded"


# The one table: error class -> HTTP status. Subclasses inherit their base's status.
HTTP_STATUS: dict[type[TokservError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidValue: 422,
    QueueFull: 429,
    ModelFailed: 500,
    InternalError: 500,
    NotReady: 503,
    ShuttingDown: 503,
    BackendUnavailable: 503,
    DeadlineExceeded: 504,
}
# Statuses that carry a Retry-After header.
RETRY_STATUSES = frozenset({429, 503})

_BY_TYPE: dict[str, type[TokservError]] = {cls.type: cls for cls in HTTP_STATUS}


def status_of(exc: TokservError) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]  # type: ignore[index]
    return 500


def error_body(type_: str, message: str, request_id: str) -> dict[str, Any]:
    """The JSON body of every error response (docs/API.md)."""
    return {"error": {"type": type_, "message": message, "request_id": request_id}}


V2_PREFIX = "/v2"  # the Open Inference Protocol routes: their errors are {"error": "<message>"}


def is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def v2_error_body(message: str) -> dict[str, Any]:
    """The error body of the Open Inference Protocol (KServe v2): ``{"error": "<message>"}``; the status comes
    from the same table, the request id from the ``x-request-id`` header."""
    return {"error": message}


def to_wire(exc: BaseException) -> dict[str, str]:
    """A job error as plain data for any queue backend. Unknown exceptions become ``model_error``."""
    if isinstance(exc, TokservError):
        return {"type": exc.type, "message": exc.message}
    return {"type": ModelFailed.type, "message": f"{type(exc).__name__}: {exc}"}


def from_wire(d: dict[str, Any]) -> TokservError:
    cls = _BY_TYPE.get(str(d.get("type")), InternalError)
    return cls(str(d.get("message", "")))
