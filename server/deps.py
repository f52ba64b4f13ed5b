"""Typed FastAPI dependencies: the app state, the API-key check, request options from headers."""

from __future__ import annotations

import hmac
import time
from typing import Annotated

from fastapi import Depends, Header, Request
from pydantic import AliasChoices, BaseModel

from server.errors import InvalidValue, Unauthorized
from server.state import AppState
from server.validation import DEADLINE_HEADER, PRIORITY_HEADER, parse_deadline_ms, parse_priority


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


IdempotencyKey = Annotated[str | None, Header(
    min_length=1, max_length=255, description="repeat a request without running it again (1-255 characters)")]
DeadlineHeader = Annotated[str | None, Header(
    pattern=DEADLINE_HEADER, description="deadline in milliseconds from now (decimal, at most a day)")]
PriorityHeader = Annotated[str | None, Header(
    pattern=PRIORITY_HEADER, description="-100..100, higher runs sooner")]


class RequestOptions:
    """Per-request options from headers: deadline (``x-deadline-ms``), priority (``x-priority``, higher runs
    sooner), ``Idempotency-Key``, request id. The values are checked by :mod:`server.validation`."""

    def __init__(self, request: Request, state: StateDep, x_deadline_ms: DeadlineHeader = None,
                 x_priority: PriorityHeader = None, idempotency_key: IdempotencyKey = None) -> None:
        self.priority = parse_priority(x_priority, "x-priority", text=True) if x_priority is not None else 0
        self.request_id: str = request.scope.get("state", {}).get("request_id", "")
        budget = (state.settings.default_deadline_s if x_deadline_ms is None
                  else parse_deadline_ms(x_deadline_ms, "x-deadline-ms", text=True))
        self.deadline = time.time() + budget
        self.idempotency_key = idempotency_key


def known_query(request: Request) -> None:
    """Unknown query parameters are refused (422 naming them): the route's declared ones (single parameters,
    and the fields of a query model such as :class:`server.schemas.GenerateQuery`) are the only ones
    accepted."""
    route = request.scope.get("route")
    if not request.query_params or route is None:
        return
    allowed = _allowed_query(route)
    unknown = sorted({k for k in request.query_params if k not in allowed})
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise InvalidValue(f"unknown query parameter(s) {shown}: this route takes {sorted(allowed) or 'none'}")


def _allowed_query(route: object) -> frozenset[str]:
    cached = getattr(route, "_tokserve_query", None)
    if cached is None:
        names: set[str] = set()
        todo = [route.dependant]  # type: ignore[attr-defined]
        while todo:  # the route's parameters and its dependencies' parameters
            dep = todo.pop()
            for p in dep.query_params:
                names |= _query_names(p.field_info.annotation, p.alias)
            todo.extend(dep.dependencies)
        cached = frozenset(names)
        route._tokserve_query = cached  # type: ignore[attr-defined]
    return cached


def _query_names(annotation: object, alias: str) -> set[str]:
    """The query names one declared parameter takes: its alias, or for a query model (``Annotated[Model,
    Query()]``) each field's name, alias and alias choices."""
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return {alias}
    names: set[str] = set()
    for name, f in annotation.model_fields.items():
        names |= {name, f.alias or name}
        if isinstance(f.validation_alias, AliasChoices):
            names |= {c for c in f.validation_alias.choices if isinstance(c, str)}
        elif isinstance(f.validation_alias, str):
            names.add(f.validation_alias)
    return names


OptionsDep = Annotated[RequestOptions, Depends(RequestOptions)]
