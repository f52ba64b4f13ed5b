"""Issue 17 on the CPU: ``TOKSERVE_DTYPE=bfloat16`` and ``TOKSERVE_RUNTIME=auto`` serve correctly.

* bfloat16 over real HTTP (tiny models): tokens, images and generated latents agree with a float32 server
  within the reduced-precision tolerance below. bf16 keeps 8 bits of mantissa (a relative step of 2^-8 =
  3.9e-3 per rounding); through a model's dozens of roundings the error grows to about 1e-2 relative (the
  runner tests' bound is 3e-2), and 4 sampler steps compound it.
* auto through the engine's own loading (``build_runtimes``) on the shipped defaults: it picks ONNX Runtime
  where the recorded CPU table says (TAEF2 encode / decode and the SiT denoiser, every batch size), eager
  PyTorch elsewhere and whenever exact attention is asked, and agrees with eager PyTorch
  within the export parity tolerance (1e-4 relative per call).
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from server_testkit import REPO, real_jpegs, start_server
from test_server_runtimes import _calls  # encode, decode, one seeded generation, /v1/models runtimes

NPY = "application/x-npy"
BF16_TOL = {"tokens": 3e-2, "images": 3e-2, "latents": 5e-2}  # ||out - ref|| / ||ref||
PARITY_TOL = 1e-4  # max |out - ref| / max |ref|, the export parity tolerance


def _rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-12))


def test_bfloat16_on_the_cpu_serves_what_float32_serves(tmp_path) -> None:
    jpegs = [j for j, _ in real_jpegs(2)]
    got = {}
    for dtype in ("float32", "bfloat16"):
        (tmp_path / dtype).mkdir()
        server = start_server(tmp_path / dtype, {"TOKSERVE_DTYPE": dtype, "TOKSERVE_DEVICE": "cpu",
                                                 "TOKSERVE_RUNTIME": "torch"})
        try:
            got[dtype] = _calls(server.url, jpegs)
        finally:
            server.stop()
    ref, out = got["float32"], got["bfloat16"]
    assert set(ref["runtimes"].values()) == {"torch-eager"}  # type: ignore[union-attr]
    assert set(out["runtimes"].values()) == {"torch-bf16"}  # type: ignore[union-attr]
    for key, tol in BF16_TOL.items():
        a, b = out[key], ref[key]
        assert a.shape == b.shape and a.dtype == np.float32 and np.isfinite(a).all()  # type: ignore[union-attr]
        rel = _rel(a, b)  # type: ignore[arg-type]
        print(f"bfloat16 {key}: relative error {rel:.2e} (tolerance {tol})")
        assert 0 < rel < tol, f"{key}: bf16 relative error {rel:.2e}"


@pytest.fixture(scope="module")
def shipped_specs():
    from server.engine.specs import resolve_models

    specs = resolve_models([str(REPO / "weights/default/tokenizer"), str(REPO / "weights/default/generator")])
    return list(specs.specs.values())


def _engine(specs, **settings):
    from server.engine.runtime import build_runtimes
    from server.settings import Settings

    return build_runtimes(specs, Settings(models=["x"], device="cpu", torch_threads=1, **settings))


def test_auto_on_the_cpu_picks_by_the_table_and_agrees_with_eager(shipped_specs) -> None:
    auto, eager = _engine(shipped_specs, runtime="auto"), _engine(shipped_specs, runtime="torch")
    tok, gen = (s.name for s in shipped_specs)
    assert auto[tok].name == "onnx"  # TAEF2 encode and decode: measured faster on ONNX Runtime
    assert auto[gen].name == "onnx"  # SiT: ONNX Runtime at every batch size (at worst a tie at 32)
    assert {eager[tok].name, eager[gen].name} == {"torch-eager"}
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    tokens = eager[tok].encode(images)
    cases = [(auto[tok].encode, eager[tok].encode, (images,)), (auto[tok].decode, eager[tok].decode, (tokens,))]
    for n in (2, 33):
        x, t, y = torch.randn(n, 64, 32, generator=g), torch.rand(n, generator=g), torch.randint(0, 1000, (n,))
        cases.append((auto[gen].model_fn, eager[gen].model_fn, (x, t, y)))
    for fn, ref_fn, args in cases:
        out, ref = fn(*args), ref_fn(*args)
        assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == ref.shape
        rel = float((out - ref).abs().max() / ref.abs().max())
        assert rel < PARITY_TOL, rel


def test_auto_keeps_eager_for_exact_attention(shipped_specs) -> None:
    runtimes = _engine(shipped_specs, runtime="auto", attention="exact")
    assert {rt.name for rt in runtimes.values()} == {"torch-eager"}
    assert not any(rt.batch_invariant for rt in runtimes.values())


def test_auto_runs_the_shipped_models_on_batch_invariant_runners(shipped_specs) -> None:
    """ONNX Runtime on the CPU at every batch size for the shipped tokenizer and SiT: batch-invariant by
    construction, so TOKSERVE_BATCH_INVARIANT adds no per-row calls for them."""
    for settings in ({}, {"batch_invariant": True}):
        runtimes = _engine(shipped_specs, runtime="auto", **settings)
        assert {rt.name for rt in runtimes.values()} == {"onnx"}, settings
        assert all(rt.batch_invariant for rt in runtimes.values())


def test_bfloat16_serves_every_family() -> None:
    """Reduced precision covers continuous tokenizers and SiT / DiT denoisers; discrete tokenizers and the
    MAR / MaskGIT / VAR generators keep float32 (their samplers hold float32 state), and every family serves."""
    from server_testkit import ThreadServer

    tokenizers = {"softvq-tiny-64": "torch-bf16", "softvq-taef2-tiny": "torch-bf16", "coda-taef2-64": "torch-eager",
                  "imagefolder-tiny-64": "torch-eager"}
    generators = {"sit-tiny-64x32": "torch-bf16", "mar-tiny-64x32": "torch-eager", "maskgit-tiny": "torch-eager",
                  "var-tiny-64": "torch-eager"}
    files = [("image", (f"{i}.jpg", j, "image/jpeg")) for i, (j, _) in enumerate(real_jpegs(2))]
    with ThreadServer(models=[*tokenizers, *generators], dtype="bfloat16", device="cpu", runtime="auto") as s:
        assert {n: rt.name for n, rt in s.state.engine.runtimes.items()} == {**tokenizers, **generators}
        for tok in tokenizers:
            r = httpx.post(f"{s.url}/v1/encode?model={tok}", files=files, timeout=120)
            assert r.status_code == 200, (tok, r.text)
        for gen in generators:
            r = httpx.post(f"{s.url}/v1/generate", json={"model": gen, "class": 3, "seed": 1}, timeout=300)
            assert r.status_code == 200, (gen, r.text)
