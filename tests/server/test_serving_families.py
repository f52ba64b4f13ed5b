"""Integration (real uvicorn in a thread, real HTTP): discrete tokenizers (CODA, ImageFolder) serve integer
codes through /v1/encode and /v1/decode, and MAR, MaskGIT and VAR generators serve /v1/generate with
step-level batching across concurrent requests, each row independent of its batch."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from server_testkit import ThreadServer, real_jpegs

from server.queue.base import DecodePayload, Job
from server.queue.wire import job_from_bytes, job_to_bytes

MODELS = ["softvq-tiny-64", "softvq-taef2-tiny", "mar-tiny-64x32", "coda-taef2-64", "maskgit-tiny", "imagefolder-tiny-64", "var-tiny-64"]
GENERATORS = {"mar-tiny-64x32": ([64, 32], "float32"), "maskgit-tiny": ([130], "int64"),
              "var-tiny-64": ([2, 30], "int64")}
DISCRETE = {"coda-taef2-64": ([130], 4096), "imagefolder-tiny-64": ([2, 30], 64)}


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    with ThreadServer(models=MODELS, max_wait_ms=100, max_batch_size=16) as s:
        s.step_rows = {}  # type: ignore[attr-defined]  generator -> largest batch of rows in one step
        for loop in s.state.engine.loops:
            if loop.kind.startswith("generate:"):
                name, sched = loop.model, loop.scheduler
                real_step = sched.step

                def step(real_step=real_step, name=name):  # type: ignore[no-untyped-def]
                    out = real_step()
                    rows = max((t.rows for t in out.timings), default=0)
                    s.step_rows[name] = max(s.step_rows.get(name, 0), rows)  # type: ignore[attr-defined]
                    return out

                sched.step = step
        yield s


def _npy(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.load(io.BytesIO(r.content), allow_pickle=False)


def test_models_describe_codes_and_generator_shapes(server: ThreadServer) -> None:
    info = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    for name, (shape, size) in DISCRETE.items():
        m = info[name]
        assert m["kind"] == "tokenizer" and m["token_dtype"] == "int64" and m["token_shape"] == shape
        assert m["code_structure"]["codebook_size"] == size and m["code_structure"]["shape"] == shape
    assert info["softvq-tiny-64"]["token_dtype"] == "float32" and info["softvq-tiny-64"]["code_structure"] is None
    for name, (shape, dtype) in GENERATORS.items():
        assert info[name]["token_shape"] == shape and info[name]["token_dtype"] == dtype
    assert info["maskgit-tiny"]["tokenizer"] == "coda-taef2-64" and info["var-tiny-64"]["tokenizer"] == "imagefolder-tiny-64"
    assert info["mar-tiny-64x32"]["samplers"] == ["mar"] and info["var-tiny-64"]["defaults"]["steps"] == 4


@pytest.mark.parametrize("tok", sorted(DISCRETE))
def test_encode_codes_then_decode_reproduces_the_reconstruction(server: ThreadServer, tok: str) -> None:
    shape, size = DISCRETE[tok]
    jpegs = [j for j, _ in real_jpegs(3)]
    files = [("image", (f"{i}.jpg", j, "image/jpeg")) for i, j in enumerate(jpegs)]
    r = httpx.post(f"{server.url}/v1/encode?model={tok}", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dtype"] == "int64" and body["shape"] == [3, *shape]
    codes = np.asarray(body["data"], np.int64).reshape(body["shape"])
    assert all(isinstance(v, int) for v in body["data"][:50]) and codes.min() >= 0 and codes.max() < size
    # binary codes agree with the JSON ones
    npy = _npy(httpx.post(f"{server.url}/v1/encode?model={tok}", files=files, headers={"accept": "application/x-npy"}))
    assert npy.dtype == np.int64 and np.array_equal(npy, codes)

    # decode (JSON codes, .npy codes) == the tokenizer's own decode of those codes, clamped
    module = server.state.engine.runtimes[tok].module
    with torch.inference_mode():
        expected = module.decode(torch.from_numpy(codes)).clamp(-1, 1).numpy()
    del body["model"]
    via_json = _npy(httpx.post(f"{server.url}/v1/decode?model={tok}&format=npy", json=body))
    buf = io.BytesIO()
    np.save(buf, codes)
    via_npy = _npy(httpx.post(f"{server.url}/v1/decode?model={tok}&format=npy", content=buf.getvalue(),
                              headers={"content-type": "application/x-npy"}))
    np.testing.assert_array_equal(via_json, via_npy)
    np.testing.assert_allclose(via_json, expected, atol=1e-6)
    # and it is the reconstruction of the images: encode -> decode in one process
    img = httpx.post(f"{server.url}/v1/decode?model={tok}", json={**body, "data": body["data"][:codes[0].size],
                                                                  "shape": list(shape)})
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"


def test_softvq_on_taef2_round_trips_1d_tokens(server: ThreadServer) -> None:
    """The SoftVQ tokenizer on the frozen TAEF2 serves (B, 32, D) float tokens like any SoftVQ tokenizer."""
    info = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    m = info["softvq-taef2-tiny"]
    assert m["kind"] == "tokenizer" and m["token_shape"] == [32, 16] and m["token_dtype"] == "float32"
    files = [("image", (f"{i}.jpg", j, "image/jpeg")) for i, (j, _) in enumerate(real_jpegs(2))]
    tokens = _npy(httpx.post(f"{server.url}/v1/encode?model=softvq-taef2-tiny", files=files,
                             headers={"accept": "application/x-npy"}))
    assert tokens.shape == (2, 32, 16) and tokens.dtype == np.float32
    buf = io.BytesIO()
    np.save(buf, tokens)
    images = _npy(httpx.post(f"{server.url}/v1/decode?model=softvq-taef2-tiny&format=npy", content=buf.getvalue(),
                             headers={"content-type": "application/x-npy"}))
    module = server.state.engine.runtimes["softvq-taef2-tiny"].module
    with torch.inference_mode():
        expected = module.decode(torch.from_numpy(tokens)).clamp(-1, 1).numpy()
    assert images.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(images, expected, atol=1e-5)
    png = httpx.post(f"{server.url}/v1/decode?model=softvq-taef2-tiny",
                     json={"shape": [32, 16], "dtype": "float32", "data": tokens[0].ravel().tolist()})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"


def test_bad_codes_get_a_422_that_names_the_problem(server: ThreadServer) -> None:
    url = f"{server.url}/v1/decode?model=coda-taef2-64&format=npy"

    def post(data: list, shape: list, dtype: str = "int64") -> httpx.Response:
        return httpx.post(url, json={"shape": shape, "dtype": dtype, "data": data})

    ok = [1] * 130
    assert post(ok, [130]).status_code == 200
    assert post([float(v) for v in ok], [130], "float32").status_code == 200  # whole numbers as floats
    cases = [
        (post([1.5] + ok[1:], [130], "float32"), "non-integer"),
        (post([4096] + ok[1:], [130]), "[0, 4096)"),
        (post([-1] + ok[1:], [130]), "[0, 4096)"),
        (post(ok[:64], [64]), "expected (B, 130)"),
        (post(ok, [2, 65]), "do not fit"),
    ]
    for r, needle in cases:
        assert r.status_code == 422, r.text
        assert needle in r.json()["error"]["message"], r.json()
    # a continuous tokenizer still refuses integers
    r = httpx.post(f"{server.url}/v1/decode?model=softvq-tiny-64", json={"shape": [64, 32], "dtype": "int64",
                                                                        "data": [0] * 2048})
    assert r.status_code == 422 and "continuous" in r.json()["error"]["message"]


def _generate(url: str, gen: str, cls: int, seed: int, cfg: float) -> tuple[np.ndarray, str]:
    r = httpx.post(f"{url}/v1/generate", json={"model": gen, "class": cls, "seed": seed, "cfg_scale": cfg,
                                               "return_latents": True}, timeout=120)
    assert r.status_code == 200, r.text
    lat = r.json()["latents"]
    return np.asarray(lat["data"], dtype=lat["dtype"]).reshape(lat["shape"]), r.json()["images"][0]["data"]


@pytest.mark.parametrize("gen", sorted(GENERATORS))
def test_generate_is_batched_and_rows_do_not_depend_on_their_batch(server: ThreadServer, gen: str) -> None:
    shape, dtype = GENERATORS[gen]
    alone, image = _generate(server.url, gen, 207, 11, 2.0)
    assert alone.shape == (1, *shape) and str(alone.dtype) == dtype and image

    async def crowd() -> list[tuple[np.ndarray, str]]:  # 6 concurrent requests, one thread each
        async def one(cls: int, seed: int, cfg: float) -> tuple[np.ndarray, str]:
            return await asyncio.to_thread(_generate, server.url, gen, cls, seed, cfg)

        return await asyncio.gather(*(one(c, s, g) for c, s, g in ((1, 3, 1.0), (94, 4, 3.0), (980, 5, 1.5),
                                                                   (207, 6, 2.0), (25, 7, 4.0), (207, 11, 2.0))))

    server.step_rows[gen] = 0  # type: ignore[attr-defined]
    results = asyncio.run(crowd())
    assert server.step_rows[gen] >= 2, "concurrent requests never shared a step"  # type: ignore[attr-defined]
    in_batch = results[-1][0]
    if dtype == "int64":
        np.testing.assert_array_equal(in_batch, alone)
    else:
        # float32 MAR: the head's first DDPM steps amplify batched-matmul round-off (models/sampling/mar.py),
        # and random weights make latents of size ~1e4: compare relative to that scale
        scale = float(np.abs(alone).max())
        np.testing.assert_allclose(in_batch, alone, rtol=0, atol=1e-4 * max(scale, 1.0))
    assert not np.array_equal(results[0][0], alone)  # another class / seed gives other tokens


def test_var_takes_only_its_scale_count_as_steps(server: ThreadServer) -> None:
    r = httpx.post(f"{server.url}/v1/generate", json={"model": "var-tiny-64", "class": 1, "steps": 7})
    assert r.status_code == 422 and "4 scales" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/generate", json={"model": "maskgit-tiny", "class": 1, "sampler": "euler"})
    assert r.status_code == 422 and "maskgit" in r.json()["error"]["message"]


def test_integer_codes_cross_the_queue_wire_unchanged() -> None:
    codes = torch.randint(0, 4096, (3, 2, 30))
    job = Job(payload=DecodePayload(codes), model="imagefolder-tiny-64", request_id="r1")
    back = job_from_bytes(job_to_bytes(job))
    assert back.payload.tokens.dtype == torch.int64 and torch.equal(back.payload.tokens, codes)


def test_bench_measures_every_generator_family(server: ThreadServer) -> None:
    from server.bench import run_all, table

    out = asyncio.run(run_all(server.url, ["decode", "generate"], [2], {"decode": 2, "generate": 2}, None, "all"))
    assert {k[0] for k in out} == {"decode", *(f"generate:{g}" for g in GENERATORS)}
    assert all(v > 0 for v in out.values())
    assert "generate:mar-tiny-64x32" in table({"here": out})


def test_python_client_round_trips_codes(server: ThreadServer) -> None:
    from tokserve import Client

    with Client(server.url) as c:
        assert c.models().get("coda-taef2-64").code_structure["codebook_size"] == 4096
        jpeg = real_jpegs(1)[0][0]
        tokens = c.encode(jpeg, model="imagefolder-tiny-64")
        assert tokens.array.dtype == np.int64 and tokens.array.shape == (1, 2, 30)
        image = c.decode(tokens.array, model="imagefolder-tiny-64")  # one row: one PIL image
        assert image.size == (64, 64)


def test_a_trained_v_pipeline_tokenizer_serves_codes(tmp_path) -> None:
    """XQ-GAN's V pipeline (CNN, product of two residual LFQ) trained for a few dozen steps on real images by
    the config-driven loop, then served: /encode gives its (L, Q, G) codes, /decode reproduces its own
    decode of them."""
    import models
    from training.xqgan.config import parse_config
    from training.xqgan.train import train_xqgan

    doc = {
        "model": {"backbone": "v", "name": "xqgan-v-tiny-64"},
        "alignment": {"kind": "none"},
        "discriminator": {"kind": "none"},
        "loss": {"recon": "l2", "lpips_weight": 0.0},
        "optim": {"lr": 2e-3, "warmup_steps": 0},
        "data": {"train": "tiny-val", "val": "tiny-val", "max_images": 64},
        "run": {"out_dir": str(tmp_path / "run"), "batch_size": 4, "steps": 24, "device": "cpu", "ema_decay": 0.0,
                "progress": "none", "export_dtype": "float32", "sample_every": 1000, "log_every": 8, "threads": 1},
    }
    folder = train_xqgan(parse_config(doc))
    tok = models.load_pretrained(folder)
    jpeg = real_jpegs(1)[0][0]
    with ThreadServer(models=[f"xqgan-v={folder}"]) as s:
        info = httpx.get(f"{s.url}/v1/models").json()["models"][0]
        assert info["token_dtype"] == "int64" and info["token_shape"] == [256, 2, 2]
        r = httpx.post(f"{s.url}/v1/encode", content=jpeg, headers={"content-type": "image/jpeg",
                                                                    "accept": "application/x-npy"})
        codes = _npy(r)
        assert codes.shape == (1, 256, 2, 2) and codes.dtype == np.int64
        images = _npy(httpx.post(f"{s.url}/v1/decode?format=npy", content=r.content,
                                 headers={"content-type": "application/x-npy"}))
    with torch.inference_mode():
        expected = tok.decode(torch.from_numpy(codes)).clamp(-1, 1).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-5)
