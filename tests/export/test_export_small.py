"""``python -m export`` on the small and shipped-default configurations: ONNX (onnxruntime, CPU) and TorchScript parity,
then every runtime loaded from the export folder gives the same outputs as the PyTorch model."""

from __future__ import annotations

import json

import pytest
import torch

from export.__main__ import main
from export.inputs import random_inputs
from export.metadata import read_metadata
from export.parity import compare
from export.runtime import make_runner, make_runners, resolve_model, source_facts

CASES = {
    # the small configurations
    "softvq-tiny-64": [],
    "softvq-taef2-tiny": [],  # SoftVQ on the frozen TAEF2 (convolutional stem + ViTs)
    "sit-tiny-64x32": ["--tokenizer", "softvq-tiny-64", "--parts", "denoiser,denoiser_cfg"],
    "dit-tiny-64x32": ["--tokenizer", "softvq-tiny-64"],
    # the shipped default sizes (random weights here; a trained folder exports the same way)
    "softvq-s-64": [],
    "sit-s-64x32": ["--tokenizer", "softvq-s-64"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_small_config(tmp_path, registry_model, name: str) -> None:
    out = tmp_path / name
    assert main(["--model", name, "--out", str(out), *CASES[name]]) == 0
    meta = read_metadata(out)
    assert meta.source == name and meta.opset >= 17
    assert {(r["runtime"], r["inputs"]) for r in meta.parity} == {
        (fmt, inputs) for fmt in ("onnx", "torchscript") for inputs in ("random", "real")}
    assert all(r["passed"] and r["ref_scale"] > 0 for r in meta.parity)
    assert (out / "model" / "config.json").exists()  # random weights are kept beside the export

    # The saved model is the exported one: the CLI's seeded weights, rebuilt here independently.
    model = resolve_model(out)
    reference = registry_model(name)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)

    for part, spec in meta.parts.items():
        args = random_inputs(spec, meta.facts, 5, seed=11)
        with torch.no_grad():
            ref = make_runner(out, part, runtime="torch")(*args)
        for kind in ("torchscript", "onnx"):
            r = compare(part, kind, "random", make_runner(out, part, runtime=kind)(*args), ref, meta.tolerance)
            assert r.passed, r.line()


def test_wrappers_from_export_dirs(tmp_path) -> None:
    tok_dir, gen_dir = tmp_path / "tok", tmp_path / "gen"
    assert main(["--model", "softvq-tiny-64", "--out", str(tok_dir), "--formats", "onnx", "--no-real"]) == 0
    assert main(["--model", "sit-tiny-64x32", "--out", str(gen_dir), "--formats", "onnx", "--no-real"]) == 0
    facts = json.loads((tok_dir / "export.json").read_text())["facts"]
    parts = ("encoder", "decoder")
    tok_onnx, tok_torch = make_runners(tok_dir, parts, runtime="onnx"), make_runners(tok_dir, parts, runtime="torch")
    assert tok_onnx["encoder"].name == "onnx[CPU]" and tok_torch["encoder"].name == "torch-eager"
    assert source_facts(tok_dir) == facts and facts["token_shape"] == [64, 32] and facts["image_size"] == [64, 64]
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    tokens = tok_onnx["encoder"](images)
    assert compare("encoder", "onnx", "random", tokens, tok_torch["encoder"](images)).passed
    assert compare("decoder", "onnx", "random", tok_onnx["decoder"](tokens), tok_torch["decoder"](tokens)).passed

    den_onnx = make_runner(gen_dir, "denoiser", runtime="onnx")
    den_torch = make_runner(gen_dir, "denoiser", runtime="torch")
    x, t, y = torch.randn(3, 64, 32), torch.rand(3), torch.tensor([1, 207, 1000])
    assert compare("denoiser", "onnx", "random", den_onnx(x, t, y), den_torch(x, t, y)).passed


def test_random_weights_match_the_server(registry_model) -> None:
    """A registry name means the same random weights in an export as in the server (no silent drift)."""
    from models.registry import create_model
    from server.engine.runtime import RANDOM_WEIGHTS_SEED, enliven

    for name in ("softvq-tiny-64", "sit-tiny-64x32"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            served = enliven(create_model(name)).state_dict()
        ours = registry_model(name, RANDOM_WEIGHTS_SEED).state_dict()
        assert served.keys() == ours.keys()
        for k in ours:
            torch.testing.assert_close(ours[k], served[k], rtol=0, atol=0, msg=k)
        assert float(ours["final_layer.linear.weight" if "sit" in name else "encoder.model.blocks.0.ls1.gamma"]
                     .abs().max()) > 1e-3


@pytest.mark.parametrize("folder,extra", [("tokenizer", []), ("generator", ["--tokenizer", "weights/default/tokenizer"])])
def test_export_the_shipped_default_folders(tmp_path, folder: str, extra: list[str]) -> None:
    """The trained weights in weights/default (TAEF2 tokenizer, SiT generator) export and pass parity on
    random and real inputs through ONNX Runtime (CPU) and TorchScript."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / folder
    src = repo / "weights" / "default" / folder
    assert main(["--model", str(src), "--out", str(out), *[str(repo / e) if e.startswith("weights/") else e
                                                           for e in extra]]) == 0
    meta = read_metadata(out)
    assert {(r["runtime"], r["inputs"]) for r in meta.parity} == {
        (fmt, inputs) for fmt in ("onnx", "torchscript") for inputs in ("random", "real")}
    assert all(r["passed"] for r in meta.parity)
    assert set(meta.parts) == ({"encoder", "decoder"} if folder == "tokenizer" else {"denoiser"})
