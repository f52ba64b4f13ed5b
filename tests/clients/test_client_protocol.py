"""What the SDK puts on the wire and how it reads answers (docs/API.md), over real HTTP to a scripted server."""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
from pathlib import Path

import numpy as np
import pytest
import tokserve
from client_testkit import TIMING, Reply, Request, ScriptedServer, npy_bytes, png_bytes
from PIL import Image
from tokserve import _tensors
from tokserve._images import sniff_format, to_image_bytes


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
    return buf.getvalue()


def _inputs(tmp_path: Path) -> dict[str, object]:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes())
    bmp = tmp_path / "b.bmp"
    Image.new("RGB", (8, 8), (5, 5, 5)).save(bmp)
    return {
        "path": path,
        "str-path": str(path),
        "bmp-path": bmp,
        "png-bytes": png_bytes(),
        "jpeg-bytes": _jpeg(),
        "pil": Image.new("RGB", (8, 8), (9, 9, 9)),
        "array": np.zeros((8, 8, 3), np.uint8),
        "gray-array": np.zeros((8, 8), np.uint8),
    }


def test_image_inputs_become_uploads(tmp_path: Path) -> None:
    for name, value in _inputs(tmp_path).items():
        data, mime = to_image_bytes(value)  # type: ignore[arg-type]
        fmt = sniff_format(data)
        assert mime == f"image/{fmt}", name
        assert Image.open(io.BytesIO(data)).size == (8, 8), name
    assert to_image_bytes(_jpeg())[1] == "image/jpeg"  # sent unchanged: the server crops and checks
    with pytest.raises(ValueError):
        to_image_bytes(b"definitely not an image")
    with pytest.raises(TypeError):
        to_image_bytes(np.zeros((8, 8, 3), np.float32))


def _encode_route(scripted: ScriptedServer) -> None:
    def handler(req: Request) -> Reply:
        if req.headers["content-type"].startswith("multipart/form-data"):
            n = req.body.count(b'name="image"')
        else:
            assert req.headers["content-type"] in ("image/png", "image/jpeg", "image/webp")
            n = 1
        arr = np.arange(n * 4 * 2, dtype=np.float32).reshape(n, 4, 2)
        accept = req.headers["accept"]
        if accept == "application/x-npy":
            return Reply(200, npy_bytes(arr), {"Content-Type": accept, **TIMING})
        if accept == "application/vnd.safetensors":
            return Reply(200, _tensors.to_safetensors(arr), {"Content-Type": accept, **TIMING})
        return Reply(200, {**_tensors.to_json_tensor(arr), "model": "tok-json"}, TIMING)

    scripted.route("/v1/encode", handler)


@pytest.mark.parametrize("transport", ["npy", "safetensors", "json"])
def test_encode_round_trip_each_transport(scripted: ScriptedServer, transport: str, tmp_path: Path) -> None:
    _encode_route(scripted)
    with tokserve.Client(scripted.url, transport=transport) as c:  # type: ignore[arg-type]
        lat = c.encode(png_bytes(), model="tok-a", preprocess="resize")
        many = c.encode([png_bytes(), _jpeg(), np.zeros((8, 8, 3), np.uint8)])
    assert lat.shape == (1, 4, 2) and lat.array.dtype == np.float32
    np.testing.assert_array_equal(lat.array[0], np.arange(8, dtype=np.float32).reshape(4, 2))
    assert lat.model == ("tok-json" if transport == "json" else "tok-a")
    assert lat.timings == tokserve.Timings(queue_ms=1.5, compute_ms=2.5, total_ms=4.25)
    assert lat.request_id == "rid-1"
    assert many.shape == (3, 4, 2) and len(many) == 3
    first = scripted.calls("/v1/encode")[0]
    assert first.query == {"model": ["tok-a"], "preprocess": ["resize"]}
    assert first.headers["content-type"] == "image/png" and first.headers["idempotency-key"]


def test_encode_accepts_every_input_kind(scripted: ScriptedServer, tmp_path: Path) -> None:
    _encode_route(scripted)
    with tokserve.Client(scripted.url) as c:
        for name, value in _inputs(tmp_path).items():
            assert c.encode(value).shape == (1, 4, 2), name  # type: ignore[arg-type]
        assert c.encode(np.zeros((2, 8, 8, 3), np.uint8)).shape == (2, 4, 2)  # (B, H, W, C) is B images


def _decode_route(scripted: ScriptedServer) -> None:
    def handler(req: Request) -> Reply:
        ctype = req.headers["content-type"]
        if ctype == "application/x-npy":
            arr = np.load(io.BytesIO(req.body))
        elif ctype == "application/vnd.safetensors":
            arr = _tensors.from_safetensors(req.body)
        else:
            arr = _tensors.from_json_tensor(req.json())  # type: ignore[arg-type]
        n = 1 if arr.ndim == 2 else arr.shape[0]
        fmt = req.query.get("format", ["png"])[0]
        if n == 1:
            return Reply(200, _image(fmt, 0), {"Content-Type": f"image/{fmt}", **TIMING})
        images = [base64.b64encode(_image(fmt, i)).decode() for i in range(n)]
        return Reply(200, {"model": "tok-b", "format": fmt, "images": images}, TIMING)

    scripted.route("/v1/decode", handler)


def _image(fmt: str, i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (i * 40, 0, 0)).save(buf, format=fmt.upper())
    return buf.getvalue()


@pytest.mark.parametrize("transport", ["npy", "safetensors", "json"])
def test_decode_single_and_batch(scripted: ScriptedServer, transport: str) -> None:
    _decode_route(scripted)
    tokens = np.random.default_rng(0).normal(size=(3, 4, 2)).astype(np.float32)
    with tokserve.Client(scripted.url, transport=transport) as c:  # type: ignore[arg-type]
        one = c.decode(tokens[0])  # (L, D)
        one_b = c.decode(tokens[:1], format="webp")  # (1, L, D)
        many = c.decode(tokserve.Latents(tokens, model="tok-b"))
        res = c.decode_result(tokens)
    assert isinstance(one, Image.Image) and one.size == (6, 6)
    assert isinstance(one_b, Image.Image) and one_b.format == "WEBP"
    assert isinstance(many, list) and [im.getpixel((0, 0))[0] for im in many] == [0, 40, 80]
    assert res.model == "tok-b" and res.timings.compute_ms == 2.5 and res.request_id == "rid-1"
    calls = scripted.calls("/v1/decode")
    assert calls[2].query["model"] == ["tok-b"]  # a Latents' model is sent along
    received = calls[3]
    if transport == "npy":
        np.testing.assert_array_equal(np.load(io.BytesIO(received.body)), tokens)
    with pytest.raises(ValueError):
        tokserve.Client(scripted.url).decode(np.zeros((1, 1, 4, 2), np.float32))


def test_generate_body_and_result(scripted: ScriptedServer) -> None:
    def handler(req: Request) -> Reply:
        body = req.json()
        assert isinstance(body, dict)
        n, seed = body["num_images"], body.get("seed", 41)
        imgs = [
            {"seed": seed + i, "format": "png", "data": base64.b64encode(_image("png", i)).decode()}
            for i in range(n)
        ]
        out = {
            "model": "gen-x",
            "class": body["class"],
            "seed": seed,
            "cfg_scale": body.get("cfg_scale", 1.0),
            "guidance_interval": body.get("guidance_interval", [0.0, 1.0]),
            "steps": body.get("steps", 8),
            "sampler": body.get("sampler", "euler"),
            "images": imgs,
        }
        if body.get("return_latents"):
            out["latents"] = _tensors.to_json_tensor(np.ones((n, 4, 2), np.float32))
        return Reply(200, out, TIMING)

    scripted.route("/v1/generate", handler)
    with tokserve.Client(scripted.url) as c:
        r = c.generate(207, 2, cfg_scale=1.5, guidance_interval=(0.1, 0.9), steps=4, sampler="heun", seed=5)
        plain = c.generate(3, return_latents=True, model="gen-x")
    body = scripted.calls("/v1/generate")[0].json()
    assert body == {
        "class": 207,
        "num_images": 2,
        "cfg_scale": 1.5,
        "guidance_interval": [0.1, 0.9],
        "steps": 4,
        "sampler": "heun",
        "seed": 5,
    }
    assert r.seed == 5 and r.seeds == [5, 6] and len(r.images) == 2 and r.latents is None
    assert r.class_id == 207 and r.guidance_interval == (0.1, 0.9) and r.sampler == "heun" and r.steps == 4
    assert r.timings.total_ms == 4.25
    assert plain.seed == 41 and plain.latents is not None and plain.latents.shape == (1, 4, 2)
    assert scripted.calls("/v1/generate")[1].json() == {
        "class": 3,
        "num_images": 1,
        "model": "gen-x",
        "return_latents": True,
    }


def test_generate_image_body_reads_x_seed(scripted: ScriptedServer) -> None:
    scripted.sequence(
        "/v1/generate", [Reply(200, png_bytes(), {"Content-Type": "image/png", "x-seed": "77"})]
    )
    with tokserve.Client(scripted.url) as c:
        r = c.generate(1)
    assert r.seed == 77 and r.seeds == [77] and r.images[0].size == (8, 8)


def test_models_health_ready_auth_header(scripted: ScriptedServer) -> None:
    payload = {
        "models": [
            {
                "name": "t",
                "kind": "tokenizer",
                "image_size": 64,
                "token_shape": [32, 32],
                "token_dtype": "float32",
            },
            {"name": "g", "kind": "generator", "tokenizer": "t", "classes": [1, 2], "defaults": {"steps": 8}},
        ],
        "default_tokenizer": "t",
        "default_generator": "g",
    }
    scripted.route("/v1/models", lambda r: Reply(200, payload))
    scripted.route("/healthz", lambda r: Reply(200, {}))
    scripted.route("/readyz", lambda r: Reply(503, {}))
    with tokserve.Client(scripted.url, api_key="s3cret", deadline_ms=1500) as c:
        ml = c.models()
        assert c.health() is True and c.ready() is False
        with pytest.raises(tokserve.DeadlineExceededError):
            c.wait_ready(timeout=0.2, interval=0.05)
    assert ml.names == ["t", "g"] and ml.default_generator == "g"
    assert ml.get("t").token_shape == (32, 32) and ml.get("g").defaults == {"steps": 8}
    with pytest.raises(KeyError):
        ml.get("nope")
    req = scripted.calls("/v1/models")[0]
    assert req.headers["authorization"] == "Bearer s3cret" and req.headers["x-deadline-ms"] == "1500"
    assert req.headers["user-agent"].startswith("tokserve-python/")


def test_async_client_every_method(fake_tokserve: ScriptedServer) -> None:
    async def go() -> None:
        async with tokserve.AsyncClient(fake_tokserve.url) as c:
            assert await c.health() and await c.ready()
            await c.wait_ready(timeout=1)
            assert (await c.models()).default_tokenizer == "fake-tok"
            lat = await c.encode([png_bytes(), png_bytes()])
            assert lat.shape == (2, 4, 8)
            imgs = await c.decode(lat)
            assert isinstance(imgs, list) and len(imgs) == 2
            assert isinstance(await c.decode(lat.array[0]), Image.Image)
            gen = await c.generate(207, 3, seed=10)
            assert gen.seeds == [10, 11, 12]
            results = await asyncio.gather(*(c.generate(1, seed=s) for s in range(5)))
            assert [r.seed for r in results] == list(range(5))

    asyncio.run(go())


def test_safetensors_writer_matches_reference_library() -> None:
    st = pytest.importorskip("safetensors.numpy")
    arr = np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(st.load(_tensors.to_safetensors(arr))["tokens"], arr)
    codes = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.testing.assert_array_equal(_tensors.from_safetensors(st.save({"tokens": codes})), codes)


def test_sync_and_async_clients_have_the_same_methods() -> None:
    public = [
        n for n in dir(tokserve.Client) if not n.startswith("_") and callable(getattr(tokserve.Client, n))
    ]
    for name in public:
        if name in ("close",):
            assert hasattr(tokserve.AsyncClient, "aclose")
            continue
        sync_m, async_m = getattr(tokserve.Client, name), getattr(tokserve.AsyncClient, name)
        assert inspect.signature(sync_m) == inspect.signature(async_m), name
        assert inspect.iscoroutinefunction(async_m), name
        assert (sync_m.__doc__ or "") == (async_m.__doc__ or ""), name
