"""Exceptions raised by the tokserve SDK: one class per failure kind, mapped from the HTTP status.

| status            | class                    |
|-------------------|--------------------------|
| 400, 413, 415     | :class:`BadRequestError` |
| 401, 403          | :class:`AuthenticationError` |
| 404               | :class:`NotFoundError` |
| 422               | :class:`UnprocessableError` |
| 429               | :class:`RateLimitedError` |
| 504, client timeout | :class:`DeadlineExceededError` (also a built-in :class:`TimeoutError`) |
| 500, 503, other 5xx | :class:`ServerError` |
| no response       | :class:`APIConnectionError` |

Every exception carries ``status`` (``None`` when no response came back), the server's ``message``,
its error ``kind`` (the ``error.type`` field of the body) and the ``request_id``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = [
    "APIConnectionError",
    "AuthenticationError",
    "BadRequestError",
    "DeadlineExceededError",
    "NotFoundError",
    "RateLimitedError",
    "ServerError",
    "TokserveError",
    "UnprocessableError",
    "error_from_response",
]


class TokserveError(Exception):
    """Base class of every error the SDK raises.

    Attributes:
        status: the HTTP status, or ``None`` when the server gave no response.
        message: the server's explanation (or the transport's).
        kind: the server's error type (``error.type`` in the body), when it sent one.
        request_id: the server's request id (``x-request-id``), when known.
        retry_after: seconds the server asked the client to wait (``Retry-After``), when it sent it.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        kind: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        parts = [self.message]
        if self.status is not None:
            parts.insert(0, f"[{self.status}]")
        if self.request_id:
            parts.append(f"(request id {self.request_id})")
        return " ".join(parts)


class BadRequestError(TokserveError):
    """400 / 413 / 415: the request could not be read (bad image, body too large, wrong content type)."""


class AuthenticationError(TokserveError):
    """401 / 403: the API key is missing or wrong."""


class NotFoundError(TokserveError):
    """404: unknown model or route."""


class UnprocessableError(TokserveError):
    """422: valid syntax, invalid values (token shape or dtype, NaN, class out of range, bad parameter)."""


class RateLimitedError(TokserveError):
    """429: the server's queue is full; ``retry_after`` says when to try again."""


class DeadlineExceededError(TokserveError, TimeoutError):
    """504 (the server's deadline passed) or a client-side timeout (``status`` is then ``None``)."""


class ServerError(TokserveError):
    """500 / 503 / other 5xx: the model failed on this request, or the server is not ready / shutting down."""


class APIConnectionError(TokserveError):
    """No response: the connection was refused, reset or dropped (after the retries were spent)."""


_BY_STATUS: dict[int, type[TokserveError]] = {
    400: BadRequestError,
    413: BadRequestError,
    415: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    422: UnprocessableError,
    429: RateLimitedError,
    504: DeadlineExceededError,
    500: ServerError,
    503: ServerError,
}


def error_class_for(status: int) -> type[TokserveError]:
    """The exception class for an HTTP error status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return ServerError
    if 400 <= status < 500:
        return BadRequestError
    return TokserveError


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; ``None`` if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        import email.utils
        import time

        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def error_from_response(status: int, headers: Mapping[str, str], body: bytes) -> TokserveError:
    """Build the exception for an error response.

    Reads the tokserve error body ``{"error": {"type", "message", "request_id"}}``; falls back to a FastAPI
    ``{"detail": ...}`` body or the raw text, and to the ``x-request-id`` header for the request id.
    """
    kind: str | None = None
    message: str | None = None
    request_id: str | None = None
    try:
        payload = json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, ValueError):
        payload = None
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict):
            kind = _opt_str(err.get("type"))
            message = _opt_str(err.get("message"))
            request_id = _opt_str(err.get("request_id"))
        elif isinstance(err, str):
            message = err
        if message is None and "detail" in payload:
            detail = payload["detail"]
            message = detail if isinstance(detail, str) else json.dumps(detail)
    if message is None:
        text = body.decode("utf-8", errors="replace").strip()
        message = text[:500] if text else f"HTTP {status}"
    lowered = {k.lower(): v for k, v in headers.items()}
    request_id = request_id or lowered.get("x-request-id")
    retry_after = parse_retry_after(lowered.get("retry-after"))
    cls = error_class_for(status)
    return cls(message, status=status, kind=kind, request_id=request_id, retry_after=retry_after)


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)
