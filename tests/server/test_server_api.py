"""Integration: the real server (``python -m server`` under uvicorn, subprocess) with the tiny random models,
called over HTTP: every route and input form, the aliases, the headers, the errors, /metrics, /openapi.json."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from server_testkit import RunningServer, png_bytes, real_jpegs, start_server

from models.preprocess import to_uint8

NPY = "application/x-npy"
ST = "application/vnd.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    s = start_server(tmp_path_factory.mktemp("api"), {"TOKSERVE_MAX_WAIT_MS": "2"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [d for d, _ in real_jpegs(3)]


def _arr(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _error(r: httpx.Response, status: int, type_: str, match: str = "") -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["type"] == type_
    assert body["request_id"] == r.headers["x-request-id"]
    assert re.search(match, body["message"]), body["message"]
    return body["message"]


# ---------------------------------------------------------------------------------------------- basics


def test_models_response_shows_load_warnings() -> None:
    """A published SoftVQ config without vq_mean / vq_std: the warning found at load is in its /v1/models entry."""
    from models.softvq import SoftVQConfig
    from server.engine.specs import ModelSpec
    from server.routes.models import model_info

    official = {"encoder_model": "vit_base_patch14_dinov2.lvd142m", "decoder_model": "vit_base_patch14_dinov2",
                "num_latent_tokens": 64, "codebook_embed_dim": 32, "codebook_size": 8192, "num_codebooks": 4}
    cfg = SoftVQConfig.from_official(official)
    spec = ModelSpec(name="softvq-release", kind="tokenizer", family="softvq", source="/models/softvq-release",
                     random_weights=False, config=cfg, image_size=256, token_shape=(64, 32))
    info = model_info(spec, "torch-eager").model_dump()
    assert info["warnings"] == list(cfg.load_warnings) and "vq_mean / vq_std" in info["warnings"][0]


def test_health_ready_and_models(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "detail": None}
    assert client.get("/readyz").status_code == 200
    m = client.get("/v1/models").json()
    assert m["default_tokenizer"] == "softvq-tiny-64" and m["default_generator"] == "sit-tiny-64x32"
    by = {x["name"]: x for x in m["models"]}
    tok, gen = by["softvq-tiny-64"], by["sit-tiny-64x32"]
    assert tok["kind"] == "tokenizer" and tok["image_size"] == 64 and tok["token_shape"] == [64, 32]
    assert tok["random_weights"] is True and tok["token_dtype"] == "float32" and tok["runtime"] == "torch-eager"
    assert tok["warnings"] == [] and gen["warnings"] == []
    assert gen["kind"] == "generator" and gen["tokenizer"] == "softvq-tiny-64" and gen["family"] == "sit"
    assert gen["classes"] == list(range(1000)) and gen["num_classes"] == 1000 and gen["image_size"] == 64
    assert gen["defaults"]["sampler"] == "sde" and gen["samplers"] == ["euler", "heun", "sde"]


def test_request_id_and_timing_headers(client: httpx.Client, jpegs: list[bytes]) -> None:
    r = client.post("/v1/encode", content=jpegs[0], headers={"content-type": "image/jpeg", "x-request-id": "abc-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-1"
    for h in ("x-queue-time", "x-compute-time", "x-total-time"):
        assert float(r.headers[h]) >= 0
    assert float(r.headers["x-compute-time"]) > 0
    assert float(r.headers["x-total-time"]) >= float(r.headers["x-compute-time"])
    r2 = client.get("/v1/models", headers={"x-request-id": "bad id with spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", r2.headers["x-request-id"]) and "x-total-time" in r2.headers
    r3 = client.get("/nope")
    assert "x-request-id" in r3.headers and "x-queue-time" in r3.headers


# ---------------------------------------------------------------------------------------------- encode


def test_encode_input_forms_agree(client: httpx.Client, jpegs: list[bytes]) -> None:
    multi = client.post("/v1/encode", files=[("image", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(jpegs)])
    assert multi.status_code == 200, multi.text
    body = multi.json()
    assert body["model"] == "softvq-tiny-64" and body["shape"] == [3, 64, 32] and body["dtype"] == "float32"
    tokens = np.asarray(body["data"], np.float32).reshape(3, 64, 32)
    raw = client.post("/v1/encode", content=jpegs[1], headers={"content-type": "image/jpeg"}).json()
    assert raw["shape"] == [1, 64, 32]
    b64 = [base64.b64encode(d).decode() for d in jpegs]
    one = client.post("/v1/encode", json={"image": b64[2]}).json()
    many = client.post("/encode", json={"images": b64}).json()  # alias

    def nearest(row: np.ndarray) -> int:  # the random tiny tokenizer maps images close together: compare ranks
        return int(np.argmin([np.abs(row - t).max() for t in tokens]))

    assert nearest(np.asarray(raw["data"]).reshape(64, 32)) == 1
    assert nearest(np.asarray(one["data"]).reshape(64, 32)) == 2
    np.testing.assert_allclose(np.asarray(raw["data"]).reshape(64, 32), tokens[1], atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(many["data"]).reshape(3, 64, 32), tokens, atol=1e-6, rtol=0)
    npy = client.post("/v1/encode", json={"images": b64}, headers={"accept": NPY})
    assert npy.headers["content-type"] == NPY
    np.testing.assert_allclose(np.load(io.BytesIO(npy.content)), tokens, atol=1e-6, rtol=0)
    st = client.post("/v1/encode", json={"images": b64}, headers={"accept": ST})
    assert st.headers["content-type"] == ST
    np.testing.assert_allclose(st_load(st.content)["tokens"].numpy(), tokens, atol=1e-6, rtol=0)


def test_encode_preprocess_modes(client: httpx.Client) -> None:
    rng = np.random.default_rng(0)
    wide = png_bytes(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8))
    crop = client.post("/v1/encode", content=wide, headers={"content-type": "image/png"}).json()
    crop2 = client.post("/v1/encode?preprocess=center-crop", content=wide, headers={"content-type": "image/png"})
    resize = client.post("/v1/encode?preprocess=resize", content=wide, headers={"content-type": "image/png"}).json()
    # the random tiny tokenizer is nearly blind to its input, but exactly deterministic: equal inputs give
    # bit-equal tokens, so any difference comes from the preprocessing
    assert crop2.json()["data"] == crop["data"]
    assert crop["data"] != resize["data"]
    _error(client.post("/v1/encode?preprocess=stretch", content=wide, headers={"content-type": "image/png"}),
           422, "invalid_value", "preprocess")


# ---------------------------------------------------------------------------------------------- decode


@pytest.fixture(scope="module")
def tokens(client: httpx.Client, jpegs: list[bytes]) -> np.ndarray:
    r = client.post("/v1/encode", files=[("image", ("a.jpg", d, "image/jpeg")) for d in jpegs[:2]],
                    headers={"accept": NPY})
    return np.load(io.BytesIO(r.content))


def test_decode_inputs_and_outputs(client: httpx.Client, tokens: np.ndarray) -> None:
    one = tokens[:1]
    as_json = {"shape": list(one.shape), "dtype": "float32", "data": one.reshape(-1).tolist()}
    png = client.post("/v1/decode", json=as_json)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    pixels = _arr(png.content)
    assert pixels.shape == (64, 64, 3)
    arr = client.post("/v1/decode?format=npy", json=as_json)
    assert arr.headers["content-type"] == NPY
    images = np.load(io.BytesIO(arr.content))
    assert images.shape == (1, 3, 64, 64) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert np.abs(to_uint8(torch.from_numpy(images))[0].astype(int) - pixels.astype(int)).max() <= 1
    buf = io.BytesIO()
    np.save(buf, one)
    from_npy = client.post("/v1/decode", content=buf.getvalue(), headers={"content-type": NPY})
    from_st = client.post("/decode", content=st_save({"tokens": torch.from_numpy(one)}),  # alias
                          headers={"content-type": ST})
    two_d = client.post("/v1/decode", json={"shape": [64, 32], "data": one.reshape(-1).tolist()})
    for r in (from_npy, from_st, two_d):
        assert r.status_code == 200 and np.abs(_arr(r.content).astype(int) - pixels.astype(int)).max() <= 1
    jpeg = client.post("/v1/decode?format=jpeg", json=as_json)
    webp = client.post("/v1/decode", json=as_json, headers={"accept": "image/webp"})
    body_fmt = client.post("/v1/decode", json={**as_json, "format": "jpeg"})
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"
    assert webp.headers["content-type"] == "image/webp" and webp.content[:4] == b"RIFF"
    assert body_fmt.headers["content-type"] == "image/jpeg"


def test_decode_many_rows_gives_json_images(client: httpx.Client, tokens: np.ndarray) -> None:
    r = client.post("/v1/decode", json={"shape": list(tokens.shape), "data": tokens.reshape(-1).tolist()})
    body = r.json()
    assert body["model"] == "softvq-tiny-64" and body["format"] == "png" and len(body["images"]) == 2
    first = _arr(base64.b64decode(body["images"][0]))
    alone = client.post("/v1/decode", json={"shape": [1, 64, 32], "data": tokens[0].reshape(-1).tolist()})
    assert np.abs(first.astype(int) - _arr(alone.content).astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------- generate


def test_generate_query_json_alias_and_seeds(client: httpx.Client) -> None:
    q = client.post("/v1/generate?class=207&seed=5&steps=3&num_images=2&cfg_scale=2.0")
    assert q.status_code == 200, q.text
    body = q.json()
    assert body["model"] == "sit-tiny-64x32" and body["class"] == 207 and body["seed"] == 5
    assert body["steps"] == 3 and body["sampler"] == "sde" and body["cfg_scale"] == 2.0
    assert body["guidance_interval"] == [0.0, 0.7] and "latents" not in body
    assert [im["seed"] for im in body["images"]] == [5, 6] and q.headers["x-seed"] == "5"
    j = client.post("/generate", json={"class_id": 207, "seed": 5, "steps": 3, "num_images": 2, "cfg_scale": 2.0})
    assert [im["data"] for im in j.json()["images"]] == [im["data"] for im in body["images"]]
    aq = client.post("/generate?class=207&seed=5&steps=3&num_images=2&cfg_scale=2.0")  # the alias takes the query too
    assert aq.status_code == 200, aq.text
    assert [im["data"] for im in aq.json()["images"]] == [im["data"] for im in body["images"]]
    second = client.post("/v1/generate?class=207&seed=6&steps=3&cfg_scale=2.0", headers={"accept": "image/png"})
    assert second.headers["content-type"] == "image/png" and second.headers["x-seed"] == "6"
    assert np.array_equal(_arr(second.content), _arr(base64.b64decode(body["images"][1]["data"])))
    assert _arr(second.content).shape == (64, 64, 3)


def test_generate_random_seed_is_returned_and_reproducible(client: httpx.Client) -> None:
    a = client.post("/v1/generate", json={"class": 3, "steps": 2}).json()
    b = client.post("/v1/generate", json={"class": 3, "steps": 2, "seed": a["seed"]}).json()
    assert a["images"][0]["data"] == b["images"][0]["data"]


def test_generate_latents_decode_to_its_images(client: httpx.Client) -> None:
    g = client.post("/v1/generate", json={"class": 1, "seed": 9, "steps": 2, "return_latents": True,
                                          "sampler": "euler", "guidance_interval": [0.2, 0.9]}).json()
    assert g["latents"]["shape"] == [1, 64, 32] and g["sampler"] == "euler"
    d = client.post("/v1/decode", json=g["latents"])
    assert np.abs(_arr(d.content).astype(int) - _arr(base64.b64decode(g["images"][0]["data"])).astype(int)).max() <= 1


def test_guidance_interval_forms_agree(client: httpx.Client) -> None:
    a = client.post("/v1/generate?class=5&seed=1&steps=3&cfg_scale=3&guidance_low=0.2&guidance_high=0.6").json()
    b = client.post("/v1/generate", json={"class": 5, "seed": 1, "steps": 3, "cfg_scale": 3,
                                          "guidance_interval": [0.2, 0.6]}).json()
    c = client.post("/v1/generate", json={"class": 5, "seed": 1, "steps": 3, "cfg_scale": 3}).json()
    assert a["images"] == b["images"] and a["guidance_interval"] == [0.2, 0.6]
    assert c["images"] != a["images"]


def test_idempotency_key_runs_once(client: httpx.Client) -> None:
    def generated() -> float:
        text = client.get("/metrics").text
        m = re.search(r'tokserve_images_total\{model="sit-tiny-64x32",op="generate"\} ([0-9.e+]+)', text)
        return float(m.group(1)) if m else 0.0

    before = generated()
    h = {"idempotency-key": f"key-{time.time()}"}
    a = client.post("/v1/generate", json={"class": 8, "steps": 2, "num_images": 2}, headers=h)
    b = client.post("/v1/generate", json={"class": 8, "steps": 2, "num_images": 2}, headers=h)
    assert a.status_code == b.status_code == 200 and a.json() == b.json()
    assert generated() - before == 2
    _error(client.post("/v1/generate", json={"class": 9, "steps": 2}, headers=h), 422, "invalid_value",
           "Idempotency-Key")


# ---------------------------------------------------------------------------------------------- errors


def test_400_bad_input(client: httpx.Client, jpegs: list[bytes]) -> None:
    _error(client.post("/v1/encode", content=jpegs[0][:400], headers={"content-type": "image/jpeg"}),
           400, "bad_request", "truncated|corrupt")
    _error(client.post("/v1/encode", json={"image": "%%%"}), 400, "bad_request", "base64")
    _error(client.post("/v1/decode", content=b"{not json", headers={"content-type": "application/json"}),
           400, "bad_request", "malformed JSON")
    _error(client.post("/v1/decode", content=b"junk", headers={"content-type": NPY}), 400, "bad_request", "npy")


def test_404_unknown_model_and_route(client: httpx.Client, jpegs: list[bytes]) -> None:
    _error(client.post("/v1/encode?model=nope", content=jpegs[0], headers={"content-type": "image/jpeg"}),
           404, "not_found", r"unknown tokenizer 'nope'.*softvq-tiny-64")
    _error(client.post("/v1/generate", json={"class": 1, "model": "softvq-tiny-64"}), 404, "not_found",
           "unknown generator")
    _error(client.get("/v3/everything"), 404, "not_found", "no route")
    v2 = client.get("/v2/everything")  # under /v2 (Open Inference Protocol): the protocol's error form
    assert v2.status_code == 404 and v2.json() == {"error": "no route GET /v2/everything"}


def test_415_unsupported_content(client: httpx.Client) -> None:
    _error(client.post("/v1/encode", content=b"hi", headers={"content-type": "text/plain"}), 415,
           "unsupported_media_type", "multipart")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    _error(client.post("/v1/encode", content=gif.getvalue(), headers={"content-type": "image/png"}), 415,
           "unsupported_media_type", "GIF")
    _error(client.post("/v1/decode", content=b"x", headers={"content-type": "image/png"}), 415,
           "unsupported_media_type", "")


def test_422_invalid_values(client: httpx.Client) -> None:
    _error(client.post("/v1/decode", json={"shape": [1, 64, 16], "data": [0.0] * 1024}), 422, "invalid_value",
           r"\(B, 64, 32\)")
    nan = json.dumps({"shape": [1, 64, 32], "data": [0.0] * 2047 + [float("nan")]})
    _error(client.post("/v1/decode", content=nan, headers={"content-type": "application/json"}), 422,
           "invalid_value", "NaN")
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 64, 32), np.int64))
    _error(client.post("/v1/decode", content=buf.getvalue(), headers={"content-type": NPY}), 422,
           "invalid_value", "int64")
    _error(client.post("/v1/generate?class=1000"), 422, "invalid_value", r"class 1000 .* 0\.\.999")
    _error(client.post("/v1/generate", json={"class": 1, "sampler": "ddim"}), 422, "invalid_value",
           r"euler.*heun.*sde")
    _error(client.post("/v1/generate?class=1&steps=0"), 422, "invalid_value", "steps")
    _error(client.post("/v1/generate?class=1&cfg_scale=abc"), 422, "invalid_value", "cfg_scale")
    _error(client.post("/v1/generate?class=1&cfg=2"), 422, "invalid_value", "cfg")
    _error(client.post("/v1/generate", json={"steps": 2}), 422, "invalid_value", "class is required")
    _error(client.post("/v1/generate", json={"class": 1, "guidance_interval": [0.8, 0.2]}), 422,
           "invalid_value", "guidance interval")
    _error(client.post("/v1/generate", json={"class": 1}, headers={"x-deadline-ms": "soon"}), 422,
           "invalid_value", "x-deadline-ms")


def test_504_deadline(client: httpx.Client) -> None:
    t0 = time.perf_counter()
    _error(client.post("/v1/generate", json={"class": 1, "steps": 1000, "seed": 0},
                       headers={"x-deadline-ms": "300"}), 504, "deadline_exceeded", "deadline")
    assert time.perf_counter() - t0 < 5.0
    # the abandoned rows leave the running batch: the server is free again at once
    r = client.post("/v1/generate", json={"class": 1, "steps": 2, "seed": 0})
    assert r.status_code == 200 and float(r.headers["x-queue-time"]) < 1000


# ---------------------------------------------------------------------------------------------- metrics, docs


def test_metrics_content(client: httpx.Client, jpegs: list[bytes]) -> None:
    client.post("/v1/encode", content=jpegs[0], headers={"content-type": "image/jpeg"})
    client.post("/v1/generate", json={"class": 2, "steps": 2})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for needle in (
        'tokserve_queue_seconds_bucket{le="0.001",model="softvq-tiny-64",op="encode"}',
        'tokserve_compute_seconds_count{model="sit-tiny-64x32",op="generate"}',
        'tokserve_request_seconds_count{model="softvq-tiny-64",op="encode"}',
        'tokserve_batch_size_bucket{le="1.0",model="softvq-tiny-64",op="encode"}',
        'tokserve_denoise_step_seconds_count{model="sit-tiny-64x32",sampler="sde"}',
        'tokserve_requests_total{op="encode",status="200"}',
        'tokserve_requests_total{op="generate",status="422"}',
        'tokserve_images_total{model="softvq-tiny-64",op="encode"}',
        'tokserve_tokens_total{model="softvq-tiny-64",op="encode"}',
        'tokserve_queue_depth{model="sit-tiny-64x32",op="generate"} 0.0',
        'tokserve_generation_rows{model="sit-tiny-64x32"}',
        'tokserve_gpu_memory_bytes{device="cpu"} 0.0',
        "tokserve_ready 1.0",
    ):
        assert needle in text, needle
    beats = re.findall(r'tokserve_worker_heartbeat_timestamp_seconds\{worker="([^"]+)"\} ([0-9.e+]+)', text)
    assert {w for w, _ in beats} == {"encode:softvq-tiny-64", "decode:softvq-tiny-64", "generate:sit-tiny-64x32"}
    assert all(time.time() - float(v) < 10 for _, v in beats)


def test_openapi_documents_the_api(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/encode", "/v1/decode", "/v1/generate", "/v1/models", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    encode_body = spec["paths"]["/v1/encode"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "image/jpeg", "image/webp", "application/json"} <= set(encode_body)
    schemas = spec["components"]["schemas"]
    assert {"EncodeJSONRequest", "DecodeJSONRequest", "GenerateParams", "GenerateResponse", "ModelsResponse",
            "ErrorResponse"} <= set(schemas)
    assert "429" in spec["paths"]["/v1/generate"]["post"]["responses"]


def test_priority_header_on_synchronous_routes(client: httpx.Client) -> None:
    ok = client.post("/v1/generate", json={"class": 207, "seed": 1, "steps": 2}, headers={"x-priority": "50"})
    assert ok.status_code == 200, ok.text
    for bad in ("high", "1000"):
        r = client.post("/v1/generate", json={"class": 207, "seed": 1, "steps": 2}, headers={"x-priority": bad})
        assert r.status_code == 422, r.text
        assert "priority" in r.json()["error"]["message"]
