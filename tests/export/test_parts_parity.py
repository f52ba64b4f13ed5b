"""Parts, parity measures and the export/parity pipeline, on tiny stand-in models (no models/ needed)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from export.exporter import check_export_dir, export_model
from export.inputs import random_inputs
from export.metadata import read_metadata
from export.parity import ParityError, compare
from export.parts import GuidedDenoiserPart, build_part, model_facts, model_kind


def test_specs_match_outputs(standin_tokenizer, standin_generator) -> None:
    assert model_kind(standin_tokenizer) == "tokenizer" and model_kind(standin_generator) == "generator"
    for model, parts in ((standin_tokenizer, ("encoder", "decoder")),
                         (standin_generator, ("denoiser", "denoiser_cfg"))):
        facts = model_facts(model)
        for part in parts:
            module, spec = build_part(model, part)
            args = random_inputs(spec, facts, 3)
            for a, s in zip(args, spec.inputs, strict=True):
                assert a.dtype == s.torch_dtype
                assert tuple(a.shape) == tuple(3 if d == "B" else d for d in s.shape)
            out = module(*args)
            assert tuple(out.shape) == tuple(3 if d == "B" else d for d in spec.outputs[0].shape)
    with pytest.raises(ValueError, match="no part"):
        build_part(standin_tokenizer, "denoiser")


def test_random_inputs_ranges(standin_generator) -> None:
    facts = model_facts(standin_generator)
    _, spec = build_part(standin_generator, "denoiser_cfg")
    x, t, y, s = random_inputs(spec, facts, 64, seed=3)
    assert 0 <= float(t.min()) and float(t.max()) <= facts["time_scale"]
    assert int(y.min()) >= 0 and int(y.max()) <= facts["null_class"]
    assert float(s.min()) >= 1.0
    assert not torch.equal(x, random_inputs(spec, facts, 64, seed=4)[0])


def _guided_reference(gen: nn.Module, x, t, y, s, null: int, c: int) -> torch.Tensor:
    cond = gen(x, t, y)
    uncond = gen(x, t, torch.full_like(y, null))
    guided = uncond[..., :c] + s.view(-1, 1, 1) * (cond[..., :c] - uncond[..., :c])
    return torch.cat([guided, cond[..., c:]], dim=-1)


def test_compare_measures() -> None:
    ref = torch.ones(2, 3) * 2
    r = compare("p", "onnx", "random", ref + 1e-3, ref, tolerance=1e-4)
    assert r.max_abs == pytest.approx(1e-3, rel=1e-3) and r.max_rel == pytest.approx(5e-4, rel=1e-3)
    assert not r.passed
    assert compare("p", "onnx", "random", ref + 1e-5, ref, tolerance=1e-4).passed
    bad = ref.clone()
    bad[0, 0] = float("nan")
    assert not compare("p", "onnx", "random", bad, ref).passed
    with pytest.raises(ParityError):
        compare("p", "onnx", "random", ref[:1], ref)


def test_export_standins_writes_files_and_metadata(tmp_path, standin_tokenizer, standin_generator) -> None:
    meta = export_model(standin_tokenizer, tmp_path / "tok", source="standin")
    assert set(meta.files) == {"encoder", "decoder"}
    for files in meta.files.values():
        assert set(files) == {"onnx", "torchscript"}
        for name in files.values():
            assert (tmp_path / "tok" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "tok" / "export.json").read_text())
    assert saved["facts"]["vq_mean"] == pytest.approx(0.1) and saved["facts"]["token_shape"] == [8, 4]
    assert saved["parts"]["encoder"]["inputs"][0] == {"name": "images", "shape": ["B", 3, 16, 16],
                                                      "dtype": "float32"}
    labels = {(r["part"], r["runtime"], r["inputs"], r["batch"]) for r in saved["parity"]}
    # random at batches 1 and 3 (traced at 2: the batch axis must be dynamic) and real images at 4
    assert ("encoder", "onnx", "real", 4) in labels and ("decoder", "torchscript", "random", 3) in labels
    assert all(r["passed"] for r in saved["parity"]) and len(saved["parity"]) == 2 * 2 * 3
    assert read_metadata(tmp_path / "tok").parts == meta.parts

    gmeta = export_model(standin_generator, tmp_path / "gen", parts=("denoiser", "denoiser_cfg"))
    assert all(r["passed"] for r in gmeta.parity) and gmeta.facts["null_class"] == 10


def test_parity_catches_a_stale_export(tmp_path, standin_generator) -> None:
    export_model(standin_generator, tmp_path, formats=("onnx", "torchscript"))
    assert all(r.passed for r in check_export_dir(tmp_path, standin_generator))
    with torch.no_grad():
        standin_generator.out.weight.mul_(1.01)  # the PyTorch model moved on; the export did not
    results = check_export_dir(tmp_path, standin_generator)
    assert results and not any(r.passed for r in results)


class _BatchBaked(nn.Module):
    """Computes differently when the batch is 2, the size the exporter traces at: a frozen batch axis."""

    config = None
    image_size = 16
    token_shape = (8, 4)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        scale = 2.0 if images.shape[0] == 2 else 3.0
        return images.flatten(1)[:, :32].reshape(-1, 8, 4) * scale

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.flatten(1).repeat(1, 24).reshape(-1, 3, 16, 16)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_with_frozen_batch_fails_parity(tmp_path, fmt: str) -> None:
    with pytest.raises(ParityError) as err:
        export_model(_BatchBaked(), tmp_path, formats=(fmt,), parts=("encoder",), real=False)
    assert {r.batch for r in err.value.failures} == {1, 3}
    assert read_metadata(tmp_path).parity  # results are written even when the check fails


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_guided_part_is_classifier_free_guidance(make_standin_generator, learn_sigma: bool) -> None:
    gen = make_standin_generator(learn_sigma=learn_sigma)
    facts = model_facts(gen)
    module, spec = build_part(gen, "denoiser_cfg")
    assert isinstance(module, GuidedDenoiserPart)
    x, t, y, s = random_inputs(spec, facts, 5, seed=1)
    with torch.no_grad():
        got = module(x, t, y, s)
        want = _guided_reference(gen, x, t, y, s, facts["null_class"], facts["latent_shape"][1])
        assert got.shape[-1] == (8 if learn_sigma else 4)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # scale 1 is the conditional output
        torch.testing.assert_close(module(x, t, y, torch.ones(5)), gen(x, t, y), rtol=1e-5, atol=1e-6)


def test_export_leaves_the_callers_model_alone(tmp_path, standin_generator) -> None:
    standin_generator.to(torch.bfloat16)  # e.g. a server's bf16 model: exports run on a float32 CPU copy
    meta = export_model(standin_generator, tmp_path, formats=("onnx",), real=False)
    assert next(standin_generator.parameters()).dtype == torch.bfloat16
    assert meta.parts["denoiser"].inputs[0].dtype == "float32" and all(r["passed"] for r in meta.parity)
