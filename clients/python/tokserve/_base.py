"""Configuration and per-attempt decisions shared by :class:`Client` and :class:`AsyncClient`."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import httpx

from ._protocol import RequestSpec, Transport
from ._retry import RETRY_EXCEPTIONS, RETRY_STATUSES, RetryPolicy
from .errors import APIConnectionError, DeadlineExceededError, TokserveError, error_from_response

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "tokserve-python/0.1.0"


def default_url() -> str:
    """``$TOKSERVE_URL`` or ``http://127.0.0.1:8000``."""
    return os.environ.get("TOKSERVE_URL") or DEFAULT_URL


@dataclass
class Outcome:
    """What to do after one attempt: return ``response``, wait ``delay`` seconds and retry, or raise ``error``."""

    response: httpx.Response | None = None
    delay: float | None = None
    error: TokserveError | None = None


class BaseClient:
    """Settings common to both clients; see :class:`tokserve.Client` for the parameters."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        max_retries: int = 3,
        retry_policy: RetryPolicy | None = None,
        transport: Transport = "npy",
        deadline_ms: int | None = None,
        headers: dict[str, str] | None = None,
        seed: int | None = None,
        http_client: Any = None,
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("TOKSERVE_API_KEY")
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, connect_timeout))
        self.retry_policy = retry_policy or RetryPolicy(max_retries=max_retries)
        if transport not in ("npy", "safetensors", "json"):
            raise ValueError(f"transport must be npy, safetensors or json; got {transport!r}")
        self.transport: Transport = transport
        self.deadline_ms = deadline_ms
        self._rng = random.Random(seed)
        self.headers = {"User-Agent": USER_AGENT, **(headers or {})}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"
        if deadline_ms is not None:
            self.headers["x-deadline-ms"] = str(int(deadline_ms))
        self._owns_http = http_client is None
        self._http = self._make_http() if http_client is None else http_client
        if http_client is not None:
            http_client.headers.update(self.headers)

    def _make_http(self) -> Any:
        """The ``httpx.Client`` / ``httpx.AsyncClient`` this client owns (subclasses build it)."""
        raise NotImplementedError

    def _request_kwargs(self, spec: RequestSpec) -> dict[str, object]:
        kwargs: dict[str, object] = {"params": spec.params or None, "headers": spec.all_headers()}
        if spec.content is not None:
            kwargs["content"] = spec.content
        if spec.json is not None:
            kwargs["json"] = spec.json
        if spec.files is not None:
            kwargs["files"] = spec.files
        return kwargs

    def _after_response(self, resp: httpx.Response, attempt: int) -> Outcome:
        if resp.status_code < 400:
            return Outcome(response=resp)
        err = error_from_response(resp.status_code, resp.headers, resp.content)
        if resp.status_code in RETRY_STATUSES:
            delay = self.retry_policy.delay(attempt, err.retry_after, self._rng)
            if delay is not None:
                return Outcome(delay=delay)
        return Outcome(error=err)

    def _after_exception(self, exc: Exception, attempt: int) -> Outcome:
        if isinstance(exc, RETRY_EXCEPTIONS):
            delay = self.retry_policy.delay(attempt, None, self._rng)
            if delay is not None:
                return Outcome(delay=delay)
        if isinstance(exc, httpx.TimeoutException):
            return Outcome(error=DeadlineExceededError(f"client timeout: {type(exc).__name__}: {exc}"))
        return Outcome(error=APIConnectionError(f"{type(exc).__name__}: {exc} ({self.url})"))
