"""Integration (real uvicorn in a thread, real HTTP, the real ``tritonclient``): Open Inference Protocol
requests land in the same queue and the same model calls as native ones, and the API keys guard ``/v2/models``
as they guard ``/v1``.

Batches are observed exactly: the encode / decode loops' ``_execute`` is wrapped to record the request ids of
each model call. With ``max_batch_size=2`` and a long ``max_wait_ms`` a batch runs as soon as it holds two rows,
so one native and one v2 request sent together make one call of both (no timing assumption)."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from server_testkit import ThreadServer, real_jpegs
from tritonclient.utils import InferenceServerException

KEY = "v2-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOK = "softvq-tiny-64"


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    with ThreadServer(max_batch_size=2, max_wait_ms=30_000, api_keys=KEY) as s:
        s.batches = []  # type: ignore[attr-defined]  (op, [request ids]) per model call
        for loop in s.state.engine.loops:
            if loop.kind in (f"encode:{TOK}", f"decode:{TOK}"):
                real = loop._execute

                async def execute(jobs, real=real, op=loop.op):  # type: ignore[no-untyped-def]
                    s.batches.append((op, sorted(j.request_id for j in jobs)))  # type: ignore[attr-defined]
                    return await real(jobs)

                loop._execute = execute
        yield s


@pytest.fixture(scope="module")
def client(server: ThreadServer) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120.0)
    yield c
    c.close()


def _together(native: callable, v2: callable) -> tuple[object, object]:  # type: ignore[valid-type]
    """Run the native call in a thread and the tritonclient call here, at the same time."""
    out: dict[str, object] = {}
    t = threading.Thread(target=lambda: out.setdefault("native", native()))
    t.start()
    out["v2"] = v2()
    t.join(120)
    return out["native"], out["v2"]


def test_v2_and_native_requests_share_batches(server: ThreadServer, client: httpclient.InferenceServerClient) -> None:
    jpeg = real_jpegs(1)[0][0]
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))[None]
    image = httpclient.InferInput("IMAGE", list(pixels.shape), "UINT8")
    image.set_data_from_numpy(pixels)
    native, v2 = _together(
        lambda: httpx.post(f"{server.url}/v1/encode", content=jpeg, timeout=120,
                           headers={**AUTH, "content-type": "image/jpeg", "x-request-id": "native-encode",
                                    "accept": "application/x-npy"}),
        lambda: client.infer(f"{TOK}.encode", [image], headers={**AUTH, "x-request-id": "v2-encode"}))
    assert native.status_code == 200  # type: ignore[attr-defined]
    tokens = v2.as_numpy("TOKENS")  # type: ignore[attr-defined]
    assert ("encode", ["native-encode", "v2-encode"]) in server.batches  # type: ignore[attr-defined]
    np.testing.assert_allclose(tokens, np.load(io.BytesIO(native.content)), atol=1e-5)  # type: ignore[attr-defined]

    t = httpclient.InferInput("TOKENS", list(tokens.shape), "FP32")
    t.set_data_from_numpy(tokens, binary_data=False)
    native, v2 = _together(
        lambda: httpx.post(f"{server.url}/v1/decode", timeout=120, headers={**AUTH, "x-request-id": "native-decode"},
                           json={"shape": list(tokens.shape), "data": tokens.reshape(-1).tolist()}),
        lambda: client.infer(f"{TOK}.decode", [t], headers={**AUTH, "x-request-id": "v2-decode"}))
    assert native.status_code == 200  # type: ignore[attr-defined]
    assert ("decode", ["native-decode", "v2-decode"]) in server.batches  # type: ignore[attr-defined]
    np.testing.assert_array_equal(v2.as_numpy("IMAGE")[0],  # type: ignore[attr-defined]
                                  np.asarray(Image.open(io.BytesIO(native.content)).convert("RGB")))  # type: ignore[attr-defined]


def test_api_keys_guard_the_model_routes_not_health(server: ThreadServer,
                                                    client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()  # open, as /healthz and /readyz
    assert client.get_server_metadata()["name"] == "tokserve"
    assert not client.is_model_ready(f"{TOK}.encode")
    assert client.is_model_ready(f"{TOK}.encode", headers=AUTH)
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata(f"{TOK}.decode")
    assert e.value.status() == "401" and "API key" in e.value.message()
    r = httpx.post(f"{server.url}/v2/models/{TOK}.encode/infer", json={"inputs": []},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json() == {"error": "invalid API key"}
    assert client.get_model_metadata(f"{TOK}.decode", headers=AUTH)["inputs"][0]["name"] == "TOKENS"
