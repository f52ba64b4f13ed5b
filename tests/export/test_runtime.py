"""Runtimes behind one interface: same results within the parity tolerance, input casting, settings parsing."""

from __future__ import annotations

import pytest
import torch

from export.inputs import random_inputs
from export.metadata import is_export_dir
from export.parity import DEFAULT_TOLERANCE, compare
from export.parts import build_part, model_facts
from export.runtime import (
    DenoiserRuntime,
    RuntimeChoice,
    RuntimeUnavailable,
    TokenizerRuntime,
    load_runtime,
    parse_runtime_setting,
    torch_compile_available,
)

KINDS = ("torch", "torchscript", "onnx")


def test_parse_runtime_setting() -> None:
    assert parse_runtime_setting(None) == RuntimeChoice("torch", {})
    assert parse_runtime_setting("onnx").kind_for("anything") == "onnx"
    choice = parse_runtime_setting(" torch , softvq-s-64=onnx; sit-s-64x32 = torchscript ")
    assert choice.default == "torch"
    assert choice.kind_for("softvq-s-64") == "onnx" and choice.kind_for("sit-s-64x32") == "torchscript"
    assert choice.kind_for("dit-s-64x32") == "torch"
    assert parse_runtime_setting("x=torch-compile,onnx") == RuntimeChoice("onnx", {"x": "torch-compile"})
    with pytest.raises(ValueError, match="unknown runtime"):
        parse_runtime_setting("tensorrt")
    with pytest.raises(ValueError, match="unknown runtime"):
        parse_runtime_setting("softvq-s-64=onnxx")


def test_runtimes_agree_on_every_part(tmp_path, standin_tokenizer, standin_generator) -> None:
    for model, parts in ((standin_tokenizer, ("encoder", "decoder")),
                         (standin_generator, ("denoiser", "denoiser_cfg"))):
        facts = model_facts(model)
        for part in parts:
            _, spec = build_part(model, part)
            args = random_inputs(spec, facts, 5, seed=7)
            outs = {}
            for kind in KINDS:
                rt = load_runtime(kind, model, part, "cpu", cache_dir=tmp_path / f"{part}-{kind}")
                assert rt.kind == kind and rt.part == part
                outs[kind] = rt(*args)
                assert outs[kind].dtype == torch.float32 and outs[kind].device.type == "cpu"
            assert load_runtime("onnx", model, part, cache_dir=tmp_path / f"{part}-onnx").name == "onnx[CPU]"
            for kind in ("torchscript", "onnx"):
                r = compare(part, kind, "random", outs[kind], outs["torch"])
                assert r.passed, r.line()
            assert any(is_export_dir(p) for p in (tmp_path / f"{part}-onnx").iterdir())  # its content address


def test_runtime_casts_inputs_and_checks_arity(tmp_path, standin_generator) -> None:
    x = torch.randn(3, 8, 4, dtype=torch.float64)
    t = torch.rand(3, dtype=torch.float64)
    y = torch.tensor([1, 2, 10], dtype=torch.int32)
    ref = standin_generator(x.float(), t.float(), y.long())
    for kind in KINDS:
        rt = load_runtime(kind, standin_generator, "denoiser", cache_dir=tmp_path / kind)
        out = rt(x, t, y)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=DEFAULT_TOLERANCE, atol=1e-6)
        with pytest.raises(TypeError, match="takes 3 tensors"):
            rt(x, t)


def test_tokenizer_and_denoiser_wrappers(tmp_path, standin_tokenizer, standin_generator) -> None:
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref_tokens = standin_tokenizer.encode(images)
        ref_images = standin_tokenizer.decode(ref_tokens)
    for kind in KINDS:
        tok = TokenizerRuntime.load(kind, standin_tokenizer, "cpu", cache_dir=tmp_path / f"tok-{kind}")
        assert tok.facts["vq_std"] == pytest.approx(0.5) and tok.facts["image_size"] == [16, 16]
        tokens = tok.encode(images)
        assert compare("encoder", kind, "random", tokens, ref_tokens).passed
        assert compare("decoder", kind, "random", tok.decode(tokens), ref_images).passed
        den = DenoiserRuntime.load(kind, standin_generator, "cpu", with_guided=True,
                                   cache_dir=tmp_path / f"den-{kind}")
        x, t, y = torch.randn(4, 8, 4), torch.rand(4), torch.tensor([0, 3, 9, 10])
        assert compare("denoiser", kind, "random", den(x, t, y), standin_generator(x, t, y)).passed
        assert den.guided is not None
        assert den.guided(x, t, y, torch.full((4,), 3.0)).shape == (4, 8, 4)
    # a plain callable plugs in the same way (the server's default when no runtime is configured)
    wrapped = DenoiserRuntime(standin_generator)
    torch.testing.assert_close(wrapped(x, t, y), standin_generator(x, t, y))


def test_export_dir_without_the_format_is_refused(tmp_path, standin_generator) -> None:
    from export.exporter import export_model

    export_model(standin_generator, tmp_path, formats=("onnx",))
    assert load_runtime("onnx", tmp_path, "denoiser").name == "onnx[CPU]"
    with pytest.raises(RuntimeUnavailable, match="torchscript"):
        load_runtime("torchscript", tmp_path, "denoiser")
    with pytest.raises(RuntimeUnavailable, match="PyTorch model"):  # no model/ saved, source not a folder
        load_runtime("torch", tmp_path, "denoiser")
    with pytest.raises(ValueError, match="runtime kind"):
        load_runtime("tensorrt", tmp_path, "denoiser")


@pytest.mark.slow
def test_torch_compile_runtime(standin_generator) -> None:
    if not torch_compile_available("cpu"):
        pytest.fail("torch.compile needs a C++ compiler on this machine")
    rt = load_runtime("torch-compile", standin_generator, "denoiser")
    x, t, y = torch.randn(3, 8, 4), torch.rand(3), torch.tensor([0, 1, 10])
    assert rt.name == "torch-compile"
    assert compare("denoiser", "torch-compile", "random", rt(x, t, y), standin_generator(x, t, y)).passed
