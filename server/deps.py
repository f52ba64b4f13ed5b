"""Typed FastAPI dependencies: the app state, the API-key check, request options from headers."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import Depends, Header, Request

from server.errors import InvalidValue, Unauthorized
from server.state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.tokserve


StateDep = Annotated[AppState, Depends(get_state)]


def require_api_key(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """With API keys configured, ``Authorization: Bearer <key>`` must match one (constant-time compare)."""
    keys = state.settings.api_key_values()
    if not keys:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    token = given.strip().encode()
    ok = False
    for key in keys:  # compare with every key, so timing reveals neither key nor position
        ok |= hmac.compare_digest(token, key)
    if not ok:
        raise Unauthorized("invalid API key")


class RequestOptions:
    """Per-request options from headers: deadline (``x-deadline-ms``), priority (``x-priority``, higher runs
    sooner), ``Idempotency-Key``, request id."""

    def __init__(self, request: Request, state: StateDep,
                 x_deadline_ms: Annotated[str | None, Header()] = None,
                 x_priority: Annotated[str | None, Header()] = None,
                 idempotency_key: Annotated[str | None, Header()] = None) -> None:
        from server.jobs import parse_priority

        self.priority = parse_priority(x_priority) if x_priority is not None else 0
        self.request_id: str = request.scope.get("state", {}).get("request_id", "")
        if x_deadline_ms is None:
            budget = state.settings.default_deadline_s
        else:
            try:
                budget = float(x_deadline_ms) / 1000.0
            except ValueError:
                raise InvalidValue(f"x-deadline-ms must be a number of milliseconds, got {x_deadline_ms!r}") from None
            if not budget > 0:
                raise InvalidValue("x-deadline-ms must be positive")
        self.deadline = time.time() + budget
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise InvalidValue("Idempotency-Key must be 1 to 255 characters")
        self.idempotency_key = idempotency_key


OptionsDep = Annotated[RequestOptions, Depends(RequestOptions)]
