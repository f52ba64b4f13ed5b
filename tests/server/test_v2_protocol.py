"""Integration: the Open Inference Protocol (KServe v2) driven by the real ``tritonclient[http]`` client against a
live ``python -m server``: metadata and readiness, encode (IMAGE and IMAGE_BYTES), decode and generate with
JSON and binary tensors, each compared with what the native ``/v1`` routes answer for the same input, the
protocol's error bodies and statuses, and the metrics."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image
from server_testkit import RunningServer, png_bytes, real_jpegs, start_server
from tritonclient.utils import InferenceServerException

MODELS = "softvq-tiny-64,sit-tiny-64x32,imagefolder-tiny-64"
TOK, GEN, DISCRETE = "softvq-tiny-64", "sit-tiny-64x32", "imagefolder-tiny-64"
MAX_BODY = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    s = start_server(tmp_path_factory.mktemp("v2"), {"TOKSERVE_MODELS": MODELS, "TOKSERVE_MAX_BODY_BYTES": str(MAX_BODY)})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [data for data, _ in real_jpegs(3)]


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _native_tokens(url: str, files: list[bytes], model: str = TOK) -> np.ndarray:
    r = httpx.post(f"{url}/v1/encode", params={"model": model}, headers={"accept": "application/x-npy"},
                   files=[("image", (f"{i}.img", f)) for i, f in enumerate(files)], timeout=120)
    assert r.status_code == 200, r.text
    return np.load(io.BytesIO(r.content))


def _input(name: str, arr: np.ndarray, datatype: str, binary: bool) -> httpclient.InferInput:
    t = httpclient.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr, binary_data=binary)
    return t


# ---------------------------------------------------------------------------------------------- metadata, health


def test_server_health_and_metadata(client: httpclient.InferenceServerClient, server: RunningServer) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "tokserve" and "binary_tensor_data" in meta["extensions"] and meta["version"]
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    for name in (f"{TOK}.encode", f"{TOK}.decode", GEN, f"{DISCRETE}.encode"):
        assert client.is_model_ready(name), name
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready(TOK)  # a tokenizer is reached with its operation
    assert not client.is_model_ready(f"{GEN}.encode")


def test_model_metadata_names_typed_tensors_with_variable_dims(client: httpclient.InferenceServerClient,
                                                               server: RunningServer) -> None:
    info = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    L, D = info[TOK]["token_shape"]
    S = info[TOK]["image_size"]

    def tensors(items: list[dict]) -> dict[str, tuple[str, list[int]]]:
        return {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in items}

    enc = client.get_model_metadata(f"{TOK}.encode")
    assert enc["name"] == f"{TOK}.encode"
    assert tensors(enc["inputs"]) == {"IMAGE": ("UINT8", [-1, -1, -1, 3]), "IMAGE_BYTES": ("BYTES", [-1])}
    assert tensors(enc["outputs"]) == {"TOKENS": ("FP32", [-1, L, D])}
    dec = client.get_model_metadata(f"{TOK}.decode")
    assert tensors(dec["inputs"]) == {"TOKENS": ("FP32", [-1, L, D])}
    assert tensors(dec["outputs"]) == {"IMAGE": ("UINT8", [-1, S, S, 3]), "IMAGE_BYTES": ("BYTES", [-1])}
    gen = client.get_model_metadata(GEN)
    assert tensors(gen["inputs"]) == {"CLASS": ("INT64", [-1])}
    assert set(tensors(gen["outputs"])) == {"IMAGE", "IMAGE_BYTES", "TOKENS"}
    codes = client.get_model_metadata(f"{DISCRETE}.encode")
    assert tensors(codes["outputs"]) == {"CODES": ("INT64", [-1, *info[DISCRETE]["token_shape"]])}
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no-such-model")
    assert e.value.status() == "404" and "softvq-tiny-64.encode" in e.value.message()


# ---------------------------------------------------------------------------------------------- infer


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_encode_image_pixels_equals_native(client: httpclient.InferenceServerClient, server: RunningServer,
                                           jpegs: list[bytes], binary: bool) -> None:
    pixels = np.stack([_pixels(j) for j in jpegs[:2]])  # (2, 64, 64, 3) uint8
    result = client.infer(f"{TOK}.encode", [_input("IMAGE", pixels, "UINT8", binary)],
                          outputs=[httpclient.InferRequestedOutput("TOKENS", binary_data=binary)])
    tokens = result.as_numpy("TOKENS")
    native = _native_tokens(server.url, [png_bytes(p) for p in pixels])  # the same pixels, as lossless files
    assert tokens.dtype == np.float32 and tokens.shape == native.shape and tokens.shape[0] == 2
    np.testing.assert_allclose(tokens, native, atol=1e-5, rtol=0)
    assert np.abs(tokens[0] - tokens[1]).max() > 1e-3  # two different images: not a constant answer
    out = result.get_output("TOKENS")
    assert ("parameters" in out) == binary and ("data" in out) != binary


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json-base64"])
def test_encode_image_files_equals_native(client: httpclient.InferenceServerClient, server: RunningServer,
                                          jpegs: list[bytes], binary: bool) -> None:
    files = jpegs[:3]
    elements = files if binary else [base64.b64encode(f) for f in files]
    arr = np.array(elements, dtype=np.object_)
    result = client.infer(f"{TOK}.encode", [_input("IMAGE_BYTES", arr, "BYTES", binary)],
                          parameters={"preprocess": "resize"})  # no outputs: the default, binary
    tokens = result.as_numpy("TOKENS")
    native = httpx.post(f"{server.url}/v1/encode", params={"preprocess": "resize"},
                        files=[("image", (f"{i}.jpg", f, "image/jpeg")) for i, f in enumerate(files)], timeout=120)
    assert native.status_code == 200
    body = native.json()
    expected = np.asarray(body["data"], np.float32).reshape(body["shape"])
    np.testing.assert_allclose(tokens, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_decode_equals_native(client: httpclient.InferenceServerClient, server: RunningServer, jpegs: list[bytes],
                              binary: bool) -> None:
    tokens = _native_tokens(server.url, jpegs[:2])
    result = client.infer(f"{TOK}.decode", [_input("TOKENS", tokens, "FP32", binary)],
                          outputs=[httpclient.InferRequestedOutput("IMAGE", binary_data=binary),
                                   httpclient.InferRequestedOutput("IMAGE_BYTES", binary_data=binary)])
    images = result.as_numpy("IMAGE")
    assert images.dtype == np.uint8 and images.shape == (2, 64, 64, 3)
    files = result.as_numpy("IMAGE_BYTES")
    files = [f if binary else base64.b64decode(f) for f in files]
    assert [f[:8] for f in files] == [b"\x89PNG\r\n\x1a\n"] * 2
    native = httpx.post(f"{server.url}/v1/decode", json={"shape": list(tokens.shape), "data": tokens.reshape(-1).tolist()},
                        timeout=120)
    assert native.status_code == 200
    native_pixels = np.stack([_pixels(base64.b64decode(b)) for b in native.json()["images"]])
    np.testing.assert_array_equal(images, native_pixels)
    np.testing.assert_array_equal(np.stack([_pixels(f) for f in files]), native_pixels)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_generate_equals_native_for_the_same_seed(client: httpclient.InferenceServerClient, server: RunningServer,
                                                  binary: bool) -> None:
    classes = np.array([3, 207], dtype=np.int64)
    result = client.infer(GEN, [_input("CLASS", classes, "INT64", binary)],
                          parameters={"seed": 11, "steps": 4, "cfg_scale": 1.5},
                          outputs=[httpclient.InferRequestedOutput("IMAGE", binary_data=binary),
                                   httpclient.InferRequestedOutput("TOKENS", binary_data=binary)])
    images, latents = result.as_numpy("IMAGE"), result.as_numpy("TOKENS")
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8 and latents.dtype == np.float32
    assert result.get_response()["parameters"]["seed"] == 11
    for i, cls in enumerate(classes):  # row i: class i with seed + i, as a native request for that class
        native = httpx.post(f"{server.url}/v1/generate", json={
            "class": int(cls), "seed": 11 + i, "steps": 4, "cfg_scale": 1.5, "return_latents": True}, timeout=120)
        assert native.status_code == 200, native.text
        body = native.json()
        np.testing.assert_array_equal(images[i], _pixels(base64.b64decode(body["images"][0]["data"])))
        lat = np.asarray(body["latents"]["data"], np.float32).reshape(body["latents"]["shape"])[0]
        np.testing.assert_allclose(latents[i], lat, atol=1e-4, rtol=0)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 0


def test_discrete_tokenizer_codes_round_trip(client: httpclient.InferenceServerClient, server: RunningServer,
                                             jpegs: list[bytes]) -> None:
    pixels = np.stack([_pixels(j) for j in jpegs[:2]])
    codes = client.infer(f"{DISCRETE}.encode", [_input("IMAGE", pixels, "UINT8", True)]).as_numpy("CODES")
    native = _native_tokens(server.url, [png_bytes(p) for p in pixels], model=DISCRETE)
    assert codes.dtype == np.int64
    np.testing.assert_array_equal(codes, native)
    images = client.infer(f"{DISCRETE}.decode", [_input("CODES", codes, "INT64", False)]).as_numpy("IMAGE")
    r = httpx.post(f"{server.url}/v1/decode", params={"model": DISCRETE, "format": "png"},
                   json={"shape": list(codes.shape), "dtype": "int64", "data": codes.reshape(-1).tolist()}, timeout=120)
    np.testing.assert_array_equal(images, np.stack([_pixels(base64.b64decode(b)) for b in r.json()["images"]]))


# ---------------------------------------------------------------------------------------------- errors


def _status(fn) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as e:
        fn()
    return e.value.status(), e.value.message()


def test_errors_are_4xx_with_the_protocol_body(client: httpclient.InferenceServerClient, server: RunningServer,
                                               jpegs: list[bytes]) -> None:
    pixels = _pixels(jpegs[0])[None]
    status, msg = _status(lambda: client.infer("no-such-model", [_input("IMAGE", pixels, "UINT8", True)]))
    assert status == "404" and "no-such-model" in msg
    floats = pixels.astype(np.float32)
    status, msg = _status(lambda: client.infer(f"{TOK}.encode", [_input("IMAGE", floats, "FP32", True)]))
    assert status == "422" and "UINT8" in msg and "FP32" in msg
    status, msg = _status(lambda: client.infer(f"{TOK}.encode", [_input("PIXELS", pixels, "UINT8", True)]))
    assert status == "422" and "unknown input 'PIXELS'" in msg
    status, msg = _status(lambda: client.infer(f"{TOK}.encode", [_input("IMAGE", pixels[..., :2].copy(), "UINT8",
                                                                        False)]))
    assert status == "422" and "(B, H, W, 3)" in msg
    tokens = np.zeros((1, 5, 7), np.float32)
    status, msg = _status(lambda: client.infer(f"{TOK}.decode", [_input("TOKENS", tokens, "FP32", True)]))
    assert status == "422" and "do not fit" in msg
    status, msg = _status(lambda: client.infer(f"{TOK}.decode", [_input("CODES", tokens, "FP32", True)]))
    assert status == "422" and "TOKENS" in msg
    cls = np.array([3], np.int64)
    status, msg = _status(lambda: client.infer(GEN, [_input("CLASS", cls, "INT64", True)],
                                               parameters={"seed": 1, "steps": 3, "temperature": 2}))
    assert status == "422" and "temperature" in msg
    status, msg = _status(lambda: client.infer(GEN, [_input("CLASS", np.array([5000], np.int64), "INT64", True)],
                                               parameters={"steps": 3}))
    assert status == "422" and "class 5000" in msg
    status, msg = _status(lambda: client.infer(GEN, [_input("CLASS", cls, "INT64", True)],
                                               outputs=[httpclient.InferRequestedOutput("LOGITS")]))
    assert status == "422" and "unknown output 'LOGITS'" in msg
    status, _ = _status(lambda: client.infer(f"{TOK}.encode", [_input("IMAGE_BYTES", np.array([b"not an image"],
                                                                                                 np.object_), "BYTES", True)]))
    assert status == "400"


def test_malformed_bodies_and_limits_answer_4xx_json(server: RunningServer) -> None:
    url = f"{server.url}/v2/models/{TOK}.encode/infer"
    header = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                                     "parameters": {"binary_data_size": 12}}]}).encode()
    cases = [
        (b"{not json", {}, 400),
        (b"[1, 2]", {}, 400),
        (json.dumps({"inputs": []}).encode(), {}, 422),
        (json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1, 2]}]}).encode(),
         {}, 422),
        (json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1, 2, 300]}]}).encode(),
         {}, 422),
        (json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT9", "shape": [1], "data": [1]}]}).encode(), {}, 422),
        (header + bytes(12), {"Inference-Header-Content-Length": str(len(header) + 100)}, 400),
        (header + bytes(11), {"Inference-Header-Content-Length": str(len(header))}, 400),  # 11 of 12 bytes
        (header + bytes(13), {"Inference-Header-Content-Length": str(len(header))}, 400),  # one byte left over
        (header + bytes(12), {"Inference-Header-Content-Length": "-3"}, 400),
        (b"x" * (MAX_BODY + 1), {}, 413),
    ]
    for body, headers, want in cases:
        r = httpx.post(url, content=body, headers=headers, timeout=60)
        assert r.status_code == want, (body[:120], r.status_code, r.text)
        err = r.json()
        assert isinstance(err, dict) and set(err) == {"error"} and isinstance(err["error"], str), err
        assert r.headers["x-request-id"]
    ok = httpx.post(url, content=header + bytes(range(12)), headers={"Inference-Header-Content-Length": str(len(header))},
                    timeout=60)
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    assert ok.json()["outputs"][0]["name"] == "TOKENS"
    missing = httpx.get(f"{server.url}/v2/models/{GEN}/nothing")
    assert missing.status_code == 404 and isinstance(missing.json()["error"], str)


def test_v2_requests_are_counted_in_the_metrics_by_operation(client: httpclient.InferenceServerClient,
                                                             server: RunningServer, jpegs: list[bytes]) -> None:
    def count(op: str, status: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        m = re.search(rf'tokserve_requests_total{{op="{op}",status="{status}"}} ([0-9.e+]+)', text)
        return float(m[1]) if m else 0.0

    before = {op: count(op, "200") for op in ("encode", "decode", "generate")}
    bad_before = count("encode", "422")
    tokens = client.infer(f"{TOK}.encode", [_input("IMAGE", _pixels(jpegs[0])[None], "UINT8", True)]).as_numpy("TOKENS")
    client.infer(f"{TOK}.decode", [_input("TOKENS", tokens, "FP32", True)])
    client.infer(GEN, [_input("CLASS", np.array([1], np.int64), "INT64", True)], parameters={"steps": 2, "seed": 0})
    with pytest.raises(InferenceServerException):
        client.infer(f"{TOK}.encode", [_input("IMAGE", np.zeros((1, 4, 4, 3), np.float32), "FP32", True)])
    for op in before:
        assert count(op, "200") == before[op] + 1, op
    assert count("encode", "422") == bad_before + 1
    text = httpx.get(f"{server.url}/metrics").text
    assert re.search(rf'tokserve_request_seconds_count{{model="{GEN}",op="generate"}} [1-9]', text)
