"""Retries over real HTTP: backoff, Retry-After, which statuses repeat, and idempotency keys."""

from __future__ import annotations

import asyncio
import base64
import random
import threading
import time
from email.utils import formatdate

import pytest
import tokserve
from client_testkit import DROP, Reply, Request, ScriptedServer, png_bytes
from tokserve.errors import parse_retry_after

FAST = tokserve.RetryPolicy(max_retries=3, initial_delay=0.01, max_delay=0.05)
MODELS = {"models": [], "default_tokenizer": None, "default_generator": None}


def test_429_waits_retry_after_then_succeeds(scripted: ScriptedServer) -> None:
    scripted.sequence(
        "/v1/models",
        [Reply(429, {"error": {"message": "queue full"}}, {"Retry-After": "0.4"}), Reply(200, MODELS)],
    )
    with tokserve.Client(scripted.url, retry_policy=FAST) as c:
        t0 = time.perf_counter()
        c.models()
        elapsed = time.perf_counter() - t0
    calls = scripted.calls("/v1/models")
    assert len(calls) == 2
    # Retry-After (0.4 s) wins over the 0.01 s backoff, plus at most 5% jitter.
    assert 0.4 <= elapsed < 1.5
    gap = _arrival_gap(scripted, "/v1/models")
    assert gap >= 0.39


def test_503_retried_with_backoff_500_not(scripted: ScriptedServer) -> None:
    scripted.sequence("/v1/models", [Reply(503), Reply(503), Reply(200, MODELS)])
    scripted.sequence("/v1/encode", [Reply(500, {"error": {"message": "model failed"}})])
    with tokserve.Client(scripted.url, retry_policy=FAST) as c:
        c.models()
        with pytest.raises(tokserve.ServerError) as info:
            c.encode(png_bytes())
    assert len(scripted.calls("/v1/models")) == 3
    assert len(scripted.calls("/v1/encode")) == 1
    assert info.value.status == 500 and info.value.message == "model failed"


@pytest.mark.parametrize("status", [400, 404, 422, 504])
def test_client_errors_are_not_retried(scripted: ScriptedServer, status: int) -> None:
    scripted.sequence("/v1/models", [Reply(status, {"error": {"message": "no"}})])
    with tokserve.Client(scripted.url, retry_policy=FAST) as c, pytest.raises(tokserve.TokserveError):
        c.models()
    assert len(scripted.calls("/v1/models")) == 1


def test_retries_exhausted_raise_last_error(scripted: ScriptedServer) -> None:
    scripted.sequence("/v1/models", [Reply(429, {"error": {"message": "full"}}, {"Retry-After": "0"})])
    with tokserve.Client(scripted.url, retry_policy=FAST) as c, pytest.raises(tokserve.RateLimitedError):
        c.models()
    assert len(scripted.calls("/v1/models")) == FAST.max_retries + 1


def test_retry_after_beyond_cap_is_not_waited_for(scripted: ScriptedServer) -> None:
    scripted.sequence("/v1/models", [Reply(503, {"error": {"message": "down"}}, {"Retry-After": "120"})])
    with tokserve.Client(scripted.url, retry_policy=FAST) as c, pytest.raises(tokserve.ServerError) as info:
        t0 = time.perf_counter()
        c.models()
    assert time.perf_counter() - t0 < 1.0
    assert info.value.retry_after == 120.0
    assert len(scripted.calls("/v1/models")) == 1


def _idempotent_generate(scripted: ScriptedServer, drop_first: bool) -> dict[str, int]:
    """A generate route that runs once per Idempotency-Key; the first answer is lost if ``drop_first``."""
    executions: dict[str, int] = {}
    results: dict[str, dict] = {}
    lock = threading.Lock()
    attempts = {"n": 0}

    def handler(req: Request) -> Reply | object:
        key = req.headers.get("idempotency-key", "")
        with lock:
            attempts["n"] += 1
            first_attempt = attempts["n"] == 1
            if key not in results:  # run the "model"
                executions[key] = executions.get(key, 0) + 1
                seed = 1000 + sum(executions.values())
                img = base64.b64encode(png_bytes(color=(seed % 255, 0, 0))).decode()
                results[key] = {"seed": seed, "class": 3, "images": [{"seed": seed, "data": img}]}
        if drop_first and first_attempt:
            return DROP  # the work ran, but the answer never reaches the client
        return Reply(200, results[key], {"x-request-id": f"r{attempts['n']}"})

    scripted.route("/v1/generate", handler)
    return executions


def test_retried_generate_runs_once(scripted: ScriptedServer) -> None:
    executions = _idempotent_generate(scripted, drop_first=True)
    with tokserve.Client(scripted.url, retry_policy=FAST) as c:
        result = c.generate(3, seed=None)
    calls = scripted.calls("/v1/generate")
    assert len(calls) == 2  # the dropped attempt and its retry
    keys = {r.headers["idempotency-key"] for r in calls}
    assert len(keys) == 1 and len(next(iter(keys))) >= 16
    assert executions == {next(iter(keys)): 1}  # the retry did not run the model again
    assert result.seed == 1001 and result.images[0].getpixel((0, 0)) == (1001 % 255, 0, 0)


def test_async_retried_generate_runs_once(scripted: ScriptedServer) -> None:
    executions = _idempotent_generate(scripted, drop_first=True)

    async def go() -> tokserve.GenerateResult:
        async with tokserve.AsyncClient(scripted.url, retry_policy=FAST) as c:
            return await c.generate(3)

    result = asyncio.run(go())
    assert len(scripted.calls("/v1/generate")) == 2
    assert list(executions.values()) == [1]
    assert result.seed == 1001


def test_each_logical_call_has_its_own_key_and_explicit_keys_pass_through(scripted: ScriptedServer) -> None:
    executions = _idempotent_generate(scripted, drop_first=False)
    with tokserve.Client(scripted.url, retry_policy=FAST) as c:
        a = c.generate(3)
        b = c.generate(3)
        c1 = c.generate(3, idempotency_key="my-key")
        c2 = c.generate(3, idempotency_key="my-key")
    keys = [r.headers["idempotency-key"] for r in scripted.calls("/v1/generate")]
    assert keys[0] != keys[1] and keys[2:] == ["my-key", "my-key"]
    assert a.seed != b.seed
    assert c1.seed == c2.seed and executions["my-key"] == 1


def test_async_429_retry_after(scripted: ScriptedServer) -> None:
    scripted.sequence("/v1/models", [Reply(429, headers={"Retry-After": "0.3"}), Reply(200, MODELS)])

    async def go() -> float:
        async with tokserve.AsyncClient(scripted.url, retry_policy=FAST) as c:
            t0 = time.perf_counter()
            await c.models()
            return time.perf_counter() - t0

    assert asyncio.run(go()) >= 0.3
    assert len(scripted.calls("/v1/models")) == 2


def test_connection_errors_are_retried(scripted: ScriptedServer) -> None:
    scripted.sequence("/v1/models", [DROP, DROP, Reply(200, MODELS)])
    with tokserve.Client(scripted.url, retry_policy=FAST) as c:
        c.models()
    assert len(scripted.calls("/v1/models")) == 3
    scripted.sequence("/v1/models", [DROP])
    with tokserve.Client(scripted.url, retry_policy=FAST) as c, pytest.raises(tokserve.APIConnectionError):
        c.models()


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    policy = tokserve.RetryPolicy(max_retries=10, initial_delay=0.1, max_delay=1.0, jitter=0.5)
    rng = random.Random(0)
    for attempt in range(8):
        base = min(1.0, 0.1 * 2**attempt)
        samples = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(base * 0.5 <= s <= base for s in samples)
        assert max(samples) - min(samples) > base * 0.3  # jitter actually spreads the delays
    assert policy.delay(10, None) is None  # retries exhausted
    assert policy.delay(0, 2.0, rng) == pytest.approx(2.0, rel=0.06)
    assert tokserve.RetryPolicy(jitter=0.0).backoff(2) == pytest.approx(1.0)


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    in_ten = parse_retry_after(formatdate(time.time() + 10, usegmt=True))
    assert in_ten is not None and 8.0 <= in_ten <= 10.5
    assert parse_retry_after(formatdate(time.time() - 100, usegmt=True)) == 0.0


def _arrival_gap(scripted: ScriptedServer, path: str) -> float:
    """Seconds between the first two arrivals at ``path`` (from the server's own clock)."""
    stamps = [r.received for r in scripted.calls(path)]
    return stamps[1] - stamps[0]
