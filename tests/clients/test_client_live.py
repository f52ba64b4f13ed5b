"""The SDK against the real tokserve server (tiny random-weight models, CPU): every method, every error
class the server can be made to answer, retry on 429 with Retry-After, and a retried generate that runs once.

Skipped only when ``import server`` fails (the lead removes the guard once the server has landed).
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time

import httpx
import numpy as np
import pytest
import tokserve
from client_testkit import (
    DROP,
    LIVE_API_KEY,
    LiveProcess,
    Reply,
    Request,
    ScriptedServer,
    documented_metrics,
    real_images,
    server_importable,
)
from PIL import Image
from tokserve._protocol import RequestSpec

pytestmark = pytest.mark.skipif(
    not server_importable(), reason="import server failed: no server to test against"
)

GEN = {"steps": 2, "sampler": "euler"}  # cheap generations


def client(live: LiveProcess, **kw: object) -> tokserve.Client:
    return tokserve.Client(live.url, api_key=LIVE_API_KEY, **kw)  # type: ignore[arg-type]


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_health_ready_models(live_server: LiveProcess) -> None:
    with client(live_server) as c:
        assert c.health() and c.ready()
        c.wait_ready(timeout=5)
        models = c.models()
    assert set(models.names) == {"softvq-tiny-64", "sit-tiny-64x32"}
    assert models.default_tokenizer == "softvq-tiny-64" and models.default_generator == "sit-tiny-64x32"
    tok, gen = models.get("softvq-tiny-64"), models.get("sit-tiny-64x32")
    assert tok.kind == "tokenizer" and tok.image_size == 64 and tok.token_shape == (64, 32)
    assert gen.kind == "generator" and gen.tokenizer == "softvq-tiny-64" and 207 in (gen.classes or [])


def test_encode_inputs_and_transports_agree(live_server: LiveProcess, tmp_path) -> None:
    jpeg = real_images(1)[0]
    path = tmp_path / "val0.jpg"
    path.write_bytes(jpeg)
    pil = Image.open(io.BytesIO(jpeg)).convert("RGB")
    with client(live_server) as c:
        ref = c.encode(jpeg)
        assert ref.shape == (1, 64, 32) and ref.array.dtype == np.float32 and np.isfinite(ref.array).all()
        assert ref.model == "softvq-tiny-64"  # the default (npy) transport too: from the x-model header
        assert c.decode_result(ref).model == "softvq-tiny-64"
        assert ref.request_id and ref.timings.compute_ms is not None and ref.timings.total_ms is not None
        np.testing.assert_allclose(c.encode(path).array, ref.array, atol=1e-5)
        np.testing.assert_allclose(c.encode(str(path)).array, ref.array, atol=1e-5)
        from_pil, from_np = c.encode(pil), c.encode(np.asarray(pil))  # re-encoded as PNG: same pixels
        np.testing.assert_allclose(from_pil.array, from_np.array, atol=1e-5)
        np.testing.assert_allclose(from_pil.array, ref.array, atol=1e-4)
        assert c.encode(jpeg, model="softvq-tiny-64", preprocess="resize").shape == (1, 64, 32)
    for transport in ("json", "safetensors"):
        with client(live_server, transport=transport) as c:
            other = c.encode(jpeg)
        np.testing.assert_allclose(other.array, ref.array, atol=1e-5)
        assert other.model == "softvq-tiny-64"


def test_batch_encode_then_decode(live_server: LiveProcess) -> None:
    images = real_images(3)
    with client(live_server) as c:
        lat = c.encode(images)
        assert lat.shape == (3, 64, 32)
        singles = np.concatenate([c.encode(im).array for im in images])
        np.testing.assert_allclose(lat.array, singles, atol=1e-4)  # a batch of 3 == 3 batches of 1
        decoded = c.decode(lat)
        assert isinstance(decoded, list) and [im.size for im in decoded] == [(64, 64)] * 3
        one = c.decode(lat.array[1])  # (L, D)
        assert isinstance(one, Image.Image)
        assert np.abs(pixels(one) - pixels(decoded[1])).max() <= 1
        res = c.decode_result(lat.array[:1], format="jpeg")
        assert res.images[0].format == "JPEG" and res.request_id and res.timings.total_ms is not None
    for transport in ("json", "safetensors"):
        with client(live_server, transport=transport) as c:
            again = c.decode(lat.array[1:2])
        assert np.abs(pixels(again) - pixels(decoded[1])).max() <= 1  # type: ignore[arg-type]


def test_generate_seeds_are_reproducible(live_server: LiveProcess) -> None:
    with client(live_server) as c:
        two = c.generate(207, 2, seed=11, return_latents=True, **GEN)
        second = c.generate(207, 1, seed=12, **GEN)
        rand_a, rand_b = c.generate(207, **GEN), c.generate(207, **GEN)
    assert two.seed == 11 and two.seeds == [11, 12] and len(two.images) == 2
    assert two.class_id == 207 and two.steps == 2 and two.sampler == "euler" and two.model == "sit-tiny-64x32"
    assert two.latents is not None and two.latents.shape == (2, 64, 32)
    assert two.images[0].size == (64, 64)
    assert np.abs(pixels(second.images[0]) - pixels(two.images[1])).max() <= 1  # image i uses seed + i
    assert rand_a.seed is not None and rand_a.seed != rand_b.seed  # random seeds, always returned
    with client(live_server) as c:
        redecoded = c.decode(two.latents)  # the returned latents are what the images were decoded from
    assert isinstance(redecoded, list)
    for a, b in zip(two.images, redecoded, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_every_error_class(live_server: LiveProcess) -> None:
    jpeg = real_images(1)[0]
    with client(live_server, max_retries=0) as c:
        with pytest.raises(tokserve.BadRequestError) as e400:
            c.encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # truncated PNG
        assert e400.value.status == 400 and e400.value.request_id
        noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
        with pytest.raises(tokserve.BadRequestError) as e413:
            c.encode(noise)  # ~480 kB PNG > the 300 kB limit
        assert e413.value.status == 413
        with pytest.raises(tokserve.BadRequestError) as e415:
            c.send(
                RequestSpec("POST", "/v1/encode", content=b"hello", headers={"Content-Type": "text/plain"})
            )
        assert e415.value.status == 415
        with pytest.raises(tokserve.NotFoundError) as e404:
            c.encode(jpeg, model="no-such-model")
        assert e404.value.status == 404 and "no-such-model" in e404.value.message
        with pytest.raises(tokserve.UnprocessableError) as e422:
            c.decode(np.zeros((1, 3, 3), np.float32))
        assert e422.value.status == 422 and "shape" in e422.value.message
        with pytest.raises(tokserve.UnprocessableError):
            c.decode(np.full((64, 32), np.nan, np.float32))
        with pytest.raises(tokserve.UnprocessableError):
            c.generate(5000, **GEN)
    with (
        tokserve.Client(live_server.url, max_retries=0) as anonymous,
        pytest.raises(tokserve.AuthenticationError) as e401,
    ):
        anonymous.models()
    assert e401.value.status == 401
    with (
        client(live_server, max_retries=0, deadline_ms=20) as c,
        pytest.raises(tokserve.DeadlineExceededError) as e504,
    ):
        c.generate(1, steps=40, sampler="euler")
    assert e504.value.status == 504
    with (
        client(live_server, max_retries=0, timeout=0.05) as c,
        pytest.raises(tokserve.DeadlineExceededError) as eto,
    ):
        c.generate(1, steps=40, sampler="euler")
    assert eto.value.status is None and isinstance(eto.value, TimeoutError)


def test_retry_on_429_honours_retry_after(live_server: LiveProcess) -> None:
    """Fill the generator (4 long rows) and its 4-job queue; a retrying client then gets 429 with
    Retry-After, waits as told, and succeeds once room frees up; flooding clients see fast 429s."""
    attempts: list[tuple[float, int, str | None]] = []

    async def record(response: httpx.Response) -> None:
        attempts.append((time.monotonic(), response.status_code, response.headers.get("retry-after")))

    async def scenario() -> tuple[list[object], tokserve.GenerateResult]:
        full = asyncio.Event()

        async def on_flood_response(response: httpx.Response) -> None:
            if response.status_code == 429:
                full.set()

        flood_http = httpx.AsyncClient(
            base_url=live_server.url, timeout=120, event_hooks={"response": [on_flood_response]}
        )
        probe_http = httpx.AsyncClient(
            base_url=live_server.url, timeout=120, event_hooks={"response": [record]}
        )
        policy = tokserve.RetryPolicy(max_retries=200, initial_delay=0.05, max_delay=0.2)  # a slow CPU
        async with (
            tokserve.AsyncClient(
                live_server.url, api_key=LIVE_API_KEY, max_retries=0, http_client=flood_http
            ) as flood,
            tokserve.AsyncClient(
                live_server.url, api_key=LIVE_API_KEY, retry_policy=policy, http_client=probe_http
            ) as probe,
        ):
            await _until_generation_rows(flood_http, 0)  # idle: nothing left over from earlier tests
            tasks = [asyncio.create_task(flood.generate(3, steps=40, sampler="euler")) for _ in range(4)]
            await _until_generation_rows(flood_http, 4)  # the running batch is full for 40 steps
            tasks += [asyncio.create_task(flood.generate(3, **GEN)) for _ in range(6)]  # 4 queue, 2 rejected
            await asyncio.wait_for(full.wait(), timeout=60)
            result = await probe.generate(3, seed=5, **GEN)
            flooded = await asyncio.gather(*tasks, return_exceptions=True)
        await flood_http.aclose()
        await probe_http.aclose()
        return flooded, result

    flooded, result = asyncio.run(scenario())
    rejected = sum(isinstance(r, tokserve.RateLimitedError) for r in flooded)
    assert rejected >= 1  # 2 when the 6 arrive together
    assert (
        sum(isinstance(r, tokserve.GenerateResult) for r in flooded) == 10 - rejected
    )  # admitted work finishes
    for r in flooded:
        if isinstance(r, tokserve.RateLimitedError):
            assert r.retry_after == 1.0 and r.status == 429
    statuses = [s for _, s, _ in attempts]
    assert statuses[0] == 429 and statuses[-1] == 200 and set(statuses) == {429, 200}
    for (t0, status, retry_after), (t1, _, _) in zip(attempts, attempts[1:], strict=False):
        assert status == 429 and retry_after is not None
        assert t1 - t0 >= float(retry_after) * 0.95  # the client waited as told
    assert result.seed == 5 and len(result.images) == 1


async def _gauge(http: httpx.AsyncClient, name: str) -> list[float]:
    text = (await http.get("/metrics", headers={"Authorization": f"Bearer {LIVE_API_KEY}"})).text
    return [float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, flags=re.M)]


async def _until_generation_rows(http: httpx.AsyncClient, rows: int, timeout: float = 60.0) -> None:
    """Poll /metrics until the generation batch holds exactly ``rows`` rows and nothing waits in a queue
    (``rows=0``: the server is idle, e.g. done with the work earlier tests abandoned)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = await _gauge(http, "tokserve_generation_rows")
        waiting = await _gauge(http, "tokserve_queue_depth")
        if sum(running) == rows and sum(waiting) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the generation batch never held {rows} rows with an empty queue")


def test_retried_generate_runs_once(live_server: LiveProcess) -> None:
    """A proxy loses the first answer of a generate (the server ran it); the SDK retries with the same
    Idempotency-Key and gets the kept result: the same image, answered without running the model again."""
    proxy = ScriptedServer()
    answers: list[tuple[httpx.Response, float]] = []
    upstream = httpx.Client(base_url=live_server.url, timeout=120)

    def forward(req: Request) -> Reply | object:
        keep = ("authorization", "content-type", "accept", "idempotency-key")
        headers = {k: v for k, v in req.headers.items() if k in keep}
        t0 = time.perf_counter()
        resp = upstream.post(req.path, content=req.body, headers=headers)
        answers.append((resp, time.perf_counter() - t0))
        if len(answers) == 1:
            return DROP  # the server ran it; the client never hears back
        return Reply(
            resp.status_code, resp.content, {"Content-Type": resp.headers["content-type"], **_timing(resp)}
        )

    proxy.route("/v1/generate", forward)
    proxy.start()
    try:
        policy = tokserve.RetryPolicy(max_retries=2, initial_delay=0.05)
        with tokserve.Client(proxy.url, api_key=LIVE_API_KEY, retry_policy=policy) as c:
            result = c.generate(42, steps=30, sampler="euler")  # long enough to tell a run from a lookup
    finally:
        proxy.stop()
        upstream.close()
    calls = proxy.calls("/v1/generate")
    assert len(calls) == 2 and calls[0].headers["idempotency-key"] == calls[1].headers["idempotency-key"]
    (first, run_s), (second, lookup_s) = answers
    assert first.status_code == second.status_code == 200
    assert result.seed == first.json()["seed"]
    first_image = Image.open(io.BytesIO(base64.b64decode(first.json()["images"][0]["data"])))
    assert np.abs(pixels(result.images[0]) - pixels(first_image)).max() == 0
    compute_ms = float(first.headers["x-compute-time"])
    assert float(second.headers["x-total-time"]) < compute_ms / 2  # answered from the kept result
    assert lookup_s < run_s / 2


def _timing(resp: httpx.Response) -> dict[str, str]:
    names = ("x-request-id", "x-queue-time", "x-compute-time", "x-total-time")
    return {k: resp.headers[k] for k in names if k in resp.headers}


def test_async_client_against_the_server(live_server: LiveProcess) -> None:
    images = real_images(2)

    async def go() -> None:
        async with tokserve.AsyncClient(live_server.url, api_key=LIVE_API_KEY) as c:
            assert await c.health() and await c.ready()
            assert (await c.models()).default_generator == "sit-tiny-64x32"
            lats = await asyncio.gather(*(c.encode(im) for im in images))
            assert [lat.shape for lat in lats] == [(1, 64, 32)] * 2
            img = await c.decode(lats[0])
            assert isinstance(img, Image.Image) and img.size == (64, 64)
            gen = await c.generate(1, seed=3, **GEN)
            assert gen.seeds == [3]

    asyncio.run(go())


def test_metrics_the_dashboard_reads_are_exposed(live_server: LiveProcess) -> None:
    """docs/DEPLOY.md's metric list (the Grafana dashboard's queries) against the live /metrics."""
    text = httpx.get(live_server.url + "/metrics", headers={"Authorization": f"Bearer {LIVE_API_KEY}"}).text
    types = dict(re.findall(r"^# TYPE (tokserve_[a-z_]+) (\w+)$", text, flags=re.M))
    # a counter's TYPE line may or may not carry the _total suffix its samples have
    exposed = set(types) | {
        n if n.endswith("_total") else n + "_total" for n, t in types.items() if t == "counter"
    }
    missing = [m for m in documented_metrics() if m not in exposed]
    assert not missing, f"documented but not exposed: {missing}; the server exposes {sorted(exposed)}"
