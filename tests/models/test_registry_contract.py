"""Tests generated from the model registry (as timm does): every registered configuration builds and describes
itself through the one model surface; every small one (a few million parameters) is built for real, saved and
reloaded as a folder, round-trips encode / decode (tokenizers) or takes sampler steps (generators) with the
shapes its spec states, and, where the export package covers it, exports with a parity check.

A configuration registered tomorrow is covered without editing this file.
"""

from __future__ import annotations

import json

import pytest
import torch
from registry_cases import all_configs, build, kind_of, sampler_kwargs, small_configs, tokenizer_for

from models.hub import load_pretrained, save_pretrained
from models.registry import config_from_dict, config_to_dict, create_model, get_config
from models.sampling import SampleRequest, get_sampler, run_to_completion, sampler_family
from models.surface import GeneratorConfigBase, Tokenizer, TokenizerSurface, surface_of

ALL = all_configs()
SMALL = small_configs()


@pytest.mark.parametrize("name", ALL)
def test_every_config_builds_and_describes_itself(name: str) -> None:
    cfg = get_config(name)
    with torch.device("meta"):
        model = create_model(name)
    cls, again = config_from_dict(json.loads(json.dumps(config_to_dict(model))))  # the config.json round trip
    assert cls is type(model) and again == cfg
    surface = surface_of(cfg)
    if surface.kind == "tokenizer":
        assert isinstance(model, Tokenizer) and isinstance(model, TokenizerSurface)
        spec = model.token_spec
        assert spec == surface.token_spec and spec.image_size > 0 and all(n > 0 for n in spec.shape)
        assert (spec.dtype == "int64") == (spec.code_structure is not None)
        if spec.code_structure is not None:
            json.dumps(spec.code_structure.as_dict())
    else:
        assert isinstance(cfg, GeneratorConfigBase)
        entry = sampler_family(cfg.family)
        assert cfg.sampler in entry.samplers and cfg.steps >= 1
        defaults = json.loads(json.dumps(cfg.sampling_defaults()))
        assert defaults["sampler"] == cfg.sampler and defaults["steps"] == cfg.steps
        assert surface.sample_spec == cfg.sample_spec() and len(cfg.classes) >= 1


def test_the_registry_has_small_configs_of_every_kind() -> None:
    kinds = {(kind_of(n), surface_of(get_config(n)).family) for n in SMALL}
    families = {f for k, f in kinds if k == "generator"}
    assert {"sit", "dit", "mar", "maskgit", "var"} <= families
    assert {"softvq", "coda", "imagefolder", "xqgancnn"} <= {f for k, f in kinds if k == "tokenizer"}


def _images(size: int, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", SMALL)
def test_small_config_saves_reloads_and_round_trips(name: str, tmp_path) -> None:
    model = build(name, seed=1)
    folder = save_pretrained(model, tmp_path / name)
    loaded = load_pretrained(folder)
    assert type(loaded) is type(model) and loaded.config == model.config
    _same_weights(model, loaded)
    cfg = model.config
    with torch.no_grad():
        if kind_of(name) == "tokenizer":
            spec = model.token_spec
            x = _images(spec.image_size)
            tokens = model.encode(x)
            assert tuple(tokens.shape) == (2, *spec.shape) and str(tokens.dtype) == f"torch.{spec.dtype}"
            images = model.decode(tokens)
            assert tuple(images.shape) == (2, 3, spec.image_size, spec.image_size) and images.is_floating_point()
            assert torch.equal(loaded.encode(x), tokens)
            torch.testing.assert_close(loaded.decode(tokens), images, rtol=0, atol=0)
            return
        entry = sampler_family(cfg.family)
        steps = cfg.steps if entry.fixed_steps else 2
        reqs = [SampleRequest(class_id=cfg.classes[i], seed=i, steps=steps, cfg_scale=2.0, sampler=cfg.sampler,
                              path_type=cfg.path_type) for i in range(2)]
        spec = cfg.sample_spec()
        outs = []
        for m in (model, loaded):
            sampler = get_sampler(cfg.sampler, cfg, **sampler_kwargs(name, entry.model_input, entry.needs_tokenizer,
                                                                     torch.float32))
            outs.append(run_to_completion(sampler, m, reqs, spec.shape))
        assert tuple(outs[0].shape) == (2, *spec.shape)
        assert outs[0].is_floating_point() == (spec.dtype == "float32")
        assert torch.equal(outs[0], outs[1])  # the reloaded weights sample the same rows
        tok = build(tokenizer_for(name))
        assert spec.fits(tok.token_spec) is None
        decoded = tok.decode(outs[0].to(torch.int64 if spec.dtype == "int64" else torch.float32))
        assert tuple(decoded.shape) == (2, 3, tok.token_spec.image_size, tok.token_spec.image_size)


def _exportable(name: str) -> bool:
    """What ``export/`` covers: continuous tokenizers (encoder, decoder) and ``model_fn`` generators (denoiser)."""
    surface = surface_of(get_config(name))
    if surface.kind == "tokenizer":
        return surface.token_spec is not None and not surface.token_spec.discrete
    return sampler_family(surface.family).model_input == "model_fn"


EXPORTABLE = [n for n in SMALL if _exportable(n)]


@pytest.mark.parametrize("name", EXPORTABLE)
def test_small_config_exports_with_parity(name: str, tmp_path) -> None:
    from export.exporter import export_model

    meta = export_model(build(name, seed=2), tmp_path / name, source=name, formats=("torchscript",), real=False)
    assert meta.parity and all(r["passed"] for r in meta.parity)
    facts = meta.facts
    spec = surface_of(get_config(name))
    shape = spec.token_spec.shape if spec.token_spec is not None else spec.sample_spec.shape  # type: ignore[union-attr]
    assert tuple(facts.get("token_shape") or facts["latent_shape"]) == tuple(shape)


def test_export_covers_every_continuous_and_model_fn_family() -> None:
    covered = {surface_of(get_config(n)).family for n in EXPORTABLE}
    assert {"softvq", "softvqtaef2", "taef2", "sit", "dit"} <= covered
