"""Runners behind one interface (models.runtime, built by export.runtime.make_runner): same results within
the parity tolerance, input casting, settings parsing."""

from __future__ import annotations

import pytest
import torch

from export.inputs import random_inputs
from export.metadata import is_export_dir
from export.parity import DEFAULT_TOLERANCE, compare
from export.parts import build_part, model_facts
from export.runtime import (
    RuntimeChoice,
    RuntimeUnavailable,
    make_runner,
    make_runners,
    parse_runtime_setting,
    source_facts,
)
from models.runtime import ModelRunner, torch_compile_available

KINDS = ("torch", "torchscript", "onnx")


def test_parse_runtime_setting() -> None:
    assert parse_runtime_setting(None) == RuntimeChoice("auto", {})
    assert parse_runtime_setting("auto,x=onnx") == RuntimeChoice("auto", {"x": "onnx"})
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
                rt = make_runner(model, part, "cpu", runtime=kind, cache_dir=tmp_path / f"{part}-{kind}")
                assert isinstance(rt, ModelRunner) and rt.part == part
                assert rt.name == {"torch": "torch-eager", "torchscript": "torchscript", "onnx": "onnx[CPU]"}[kind]
                outs[kind] = rt(*args)
                assert outs[kind].dtype == torch.float32 and outs[kind].device.type == "cpu"
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
        rt = make_runner(standin_generator, "denoiser", runtime=kind, cache_dir=tmp_path / kind)
        out = rt(x, t, y)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=DEFAULT_TOLERANCE, atol=1e-6)
        with pytest.raises(TypeError, match="takes 3 tensors"):
            rt(x, t)


def test_tokenizer_and_denoiser_parts(tmp_path, standin_tokenizer, standin_generator) -> None:
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref_tokens = standin_tokenizer.encode(images)
        ref_images = standin_tokenizer.decode(ref_tokens)
    assert source_facts(standin_tokenizer)["vq_std"] == pytest.approx(0.5)
    for kind in KINDS:
        tok = make_runners(standin_tokenizer, ("encoder", "decoder"), "cpu", runtime=kind,
                           cache_dir=tmp_path / f"tok-{kind}")
        tokens = tok["encoder"](images)
        assert compare("encoder", kind, "random", tokens, ref_tokens).passed
        assert compare("decoder", kind, "random", tok["decoder"](tokens), ref_images).passed
        den = make_runners(standin_generator, ("denoiser", "denoiser_cfg"), "cpu", runtime=kind,
                           cache_dir=tmp_path / f"den-{kind}")
        x, t, y = torch.randn(4, 8, 4), torch.rand(4), torch.tensor([0, 3, 9, 10])
        with torch.no_grad():
            want = standin_generator(x, t, y)
        assert compare("denoiser", kind, "random", den["denoiser"](x, t, y), want).passed
        assert den["denoiser_cfg"](x, t, y, torch.full((4,), 3.0)).shape == (4, 8, 4)
        for runner in (*tok.values(), *den.values()):
            runner.warmup()
            assert runner.ready


def test_export_dir_without_the_format_is_refused(tmp_path, standin_generator) -> None:
    from export.exporter import export_model

    export_model(standin_generator, tmp_path, formats=("onnx",))
    assert make_runner(tmp_path, "denoiser", runtime="onnx").name == "onnx[CPU]"
    with pytest.raises(RuntimeUnavailable, match="torchscript"):
        make_runner(tmp_path, "denoiser", runtime="torchscript")
    with pytest.raises(RuntimeUnavailable, match="PyTorch model"):  # no model/ saved, source not a folder
        make_runner(tmp_path, "denoiser", runtime="torch")
    with pytest.raises(ValueError, match="runtime kind"):
        make_runner(tmp_path, "denoiser", runtime="tensorrt")


@pytest.mark.slow
def test_torch_compile_runtime(standin_generator) -> None:
    if not torch_compile_available("cpu"):
        pytest.fail("torch.compile needs a C++ compiler on this machine")
    rt = make_runner(standin_generator, "denoiser", runtime="torch-compile", copy_module=True)
    x, t, y = torch.randn(3, 8, 4), torch.rand(3), torch.tensor([0, 1, 10])
    assert rt.name == "torch-compile"
    assert compare("denoiser", "torch-compile", "random", rt(x, t, y), standin_generator(x, t, y)).passed
