"""Error mapping: each HTTP status becomes its exception class, with the server's message and request id."""

from __future__ import annotations

import asyncio

import pytest
import tokserve
from client_testkit import Reply, ScriptedServer, free_port
from tokserve import errors


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, tokserve.BadRequestError),
        (413, tokserve.BadRequestError),
        (415, tokserve.BadRequestError),
        (401, tokserve.AuthenticationError),
        (404, tokserve.NotFoundError),
        (422, tokserve.UnprocessableError),
        (429, tokserve.RateLimitedError),
        (500, tokserve.ServerError),
        (503, tokserve.ServerError),
        (504, tokserve.DeadlineExceededError),
    ],
)
def test_status_maps_to_class_with_message_and_request_id(
    scripted: ScriptedServer, status: int, cls: type
) -> None:
    body = {"error": {"type": f"kind{status}", "message": f"why {status}", "request_id": f"rid{status}"}}
    scripted.sequence("/v1/models", [Reply(status, body, {"Retry-After": "0"})])
    with tokserve.Client(scripted.url, max_retries=0) as c, pytest.raises(cls) as info:
        c.models()
    err = info.value
    assert type(err) is cls and isinstance(err, tokserve.TokserveError)
    assert err.status == status
    assert err.message == f"why {status}"
    assert err.kind == f"kind{status}"
    assert err.request_id == f"rid{status}"
    assert str(status) in str(err) and f"rid{status}" in str(err)
    assert len(scripted.calls("/v1/models")) == 1  # max_retries=0: never repeated


def test_fallbacks_header_request_id_and_plain_text(scripted: ScriptedServer) -> None:
    scripted.sequence("/v1/models", [Reply(502, "bad gateway upstream", {"x-request-id": "hdr-id"})])
    with tokserve.Client(scripted.url, max_retries=0) as c, pytest.raises(tokserve.ServerError) as info:
        c.models()
    assert info.value.message == "bad gateway upstream"
    assert info.value.request_id == "hdr-id"


def test_fastapi_detail_body(scripted: ScriptedServer) -> None:
    scripted.sequence("/v1/models", [Reply(422, {"detail": [{"loc": ["body", "class"], "msg": "bad"}]})])
    with (
        tokserve.Client(scripted.url, max_retries=0) as c,
        pytest.raises(tokserve.UnprocessableError) as info,
    ):
        c.models()
    assert "bad" in info.value.message and "class" in info.value.message


def test_rate_limited_carries_retry_after(scripted: ScriptedServer) -> None:
    scripted.sequence("/v1/models", [Reply(429, {"error": {"message": "queue full"}}, {"Retry-After": "7"})])
    with tokserve.Client(scripted.url, max_retries=0) as c, pytest.raises(tokserve.RateLimitedError) as info:
        c.models()
    assert info.value.retry_after == 7.0


def test_client_timeout_is_deadline_exceeded(scripted: ScriptedServer) -> None:
    scripted.sequence("/v1/models", [Reply(200, {"models": []}, delay=1.0)])
    with (
        tokserve.Client(scripted.url, timeout=0.2, max_retries=2) as c,
        pytest.raises(tokserve.DeadlineExceededError) as info,
    ):
        c.models()
    assert info.value.status is None
    assert isinstance(info.value, TimeoutError)
    assert len(scripted.calls("/v1/models")) == 1  # a read timeout is not retried


def test_connection_refused_is_api_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    policy = tokserve.RetryPolicy(max_retries=2, initial_delay=0.01)
    with tokserve.Client(url, retry_policy=policy) as c:
        with pytest.raises(tokserve.APIConnectionError) as info:
            c.models()
        assert not c.health() and not c.ready()
    assert info.value.status is None


def test_async_client_maps_errors_the_same(scripted: ScriptedServer) -> None:
    scripted.sequence(
        "/v1/models", [Reply(404, {"error": {"message": "unknown model x", "request_id": "a1"}})]
    )

    async def go() -> tokserve.TokserveError:
        async with tokserve.AsyncClient(scripted.url, max_retries=0) as c:
            try:
                await c.models()
            except tokserve.TokserveError as exc:
                return exc
        raise AssertionError("no error raised")

    err = asyncio.run(go())
    assert (
        isinstance(err, tokserve.NotFoundError)
        and err.request_id == "a1"
        and err.message == "unknown model x"
    )


def test_unknown_statuses_fall_back_by_range() -> None:
    assert errors.error_class_for(418) is tokserve.BadRequestError
    assert errors.error_class_for(599) is tokserve.ServerError
    assert errors.error_class_for(403) is tokserve.AuthenticationError
