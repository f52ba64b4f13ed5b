"""The XQ-GAN TOML config: the shipped examples parse and check; unknown or incompatible choices fail with an
error that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.xqgan.config import (
    ConfigError,
    XQGANTrainConfig,
    check_model,
    load_config,
    parse_config,
    to_dict,
)
from training.xqgan.finetune import FinetuneConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "configs" / "xqgan").glob("*.toml"))


def test_one_example_per_pipeline() -> None:
    backbones = {load_config(p).model.backbone for p in EXAMPLES}
    assert backbones == {"v", "sc"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_round_trip(path: Path) -> None:
    cfg = load_config(path)
    assert parse_config(to_dict(cfg)) == cfg


def test_v_example_checks_against_its_model() -> None:
    cfg = load_config(ROOT / "configs" / "xqgan" / "v-lfq-s-64.toml")
    mcfg = check_model(cfg)
    assert (mcfg.quantizer, mcfg.num_groups, mcfg.num_levels, mcfg.codebook_dim) == ("lfq", 2, 2, 20)
    assert (cfg.alignment.kind, cfg.discriminator.kind) == ("contrastive", "patchgan")


def test_sc_example_names_a_registered_sc_model() -> None:
    cfg = load_config(ROOT / "configs" / "xqgan" / "sc-imagefolder-tiny-64.toml")
    assert (cfg.finetune.encoder, cfg.finetune.decoder, cfg.discriminator.kind) == ("lora", "frozen", "dino")
    scratch = parse_config({**to_dict(cfg), "model": {**to_dict(cfg.model), "init_from": ""},
                            "finetune": to_dict(FinetuneConfig())})
    assert type(check_model(scratch)).__name__ == "ImageFolderConfig"
    with pytest.raises(ConfigError, match="no config.json there"):  # the example's folder is not trained here
        check_model(cfg)


def _doc(**sections) -> dict:
    base = {"model": {"backbone": "v", "name": "xqgan-v-tiny-64"}, "run": {"batch_size": 4}}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return base


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"modle": {}}, r"unknown field modle \(did you mean 'model'\?\); known: \['model', 'quantizer'"),
        (_doc(quantizer={"knd": "vq"}), r"unknown field quantizer.knd \(did you mean 'kind'\?\)"),
        (_doc(quantizer={"kind": "fsq"}), r"quantizer.kind = 'fsq' is not a known choice"),
        (_doc(model={"backbone": "vit"}), r"model.backbone = 'vit'"),
        (_doc(discriminator={"kind": "dinov2"}), r"discriminator.kind = 'dinov2'.*did you mean 'dino'"),
        (_doc(discriminator={"loss": "wgan"}), r"discriminator.loss = 'wgan'"),
        (_doc(alignment={"kind": "repa"}), r"alignment.kind = 'repa'"),
        (_doc(finetune={"encoder": "qlora"}), r"finetune.encoder = 'qlora'"),
        (_doc(quantizer={"groups": "two"}), r"quantizer.groups: Input should be a valid integer, got 'two'"),
        (_doc(quantizer={"groups": 0}), r"quantizer.groups: Input should be greater than or equal to 1"),
        (_doc(alignment={"temperature": 0}), r"alignment.temperature: Input should be greater than 0"),
        (_doc(optim={"betas": 0.9}), r"optim.betas: Input should be a valid array"),
        (_doc(model={"name": "", "init_from": ""}), r"model.name \(a registered configuration\) or model.init_from"),
        (_doc(finetune={"encoder": "lora"}), r"set model.init_from"),
        (_doc(model={"init_from": "somewhere"}, quantizer={"kind": "vq"}), r"remove \[quantizer\]"),
        (_doc(alignment={"kind": "contrastive"}, run={"batch_size": 1}), r"run.batch_size must be >= 2"),
        (_doc(discriminator={"lecam": 0.001}), r"lecam > 0 needs a discriminator"),
        (_doc(finetune={"lora_targets": ["conv1"]}), r"neither part uses 'lora'"),
        ({"kind": "tokenizer"}, r"kind = 'tokenizer'"),
    ],
)
def test_parse_errors(doc: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(doc)


@pytest.mark.parametrize(
    "doc, match",
    [
        (
            _doc(model={"name": "xqgan-v-tiny-46"}),
            r"model.name = 'xqgan-v-tiny-46' is not a registered.*xqgan-v-tiny-64",
        ),
        (_doc(model={"backbone": "sc"}), r"backbone = 'sc' needs a ViT"),
        (_doc(model={"name": "softvq-tiny-64", "backbone": "sc"}), r"not a discrete tokenizer"),
        (_doc(quantizer={"kind": "lfq", "codebook_size": 100}), r"codebook_size must be 0 or 2\*\*4"),
        (_doc(model={"overrides": {"depth": 3}}), r"model.overrides.depth"),
        (_doc(alignment={"kind": "contrastive", "group": 2}), r"alignment.group = 2 but the quantizer has 2"),
        (_doc(data={"image_size": 32}), r"data.image_size = 32 but the model takes 64"),
        (
            _doc(
                model={"overrides": {"image_size": 48, "channel_mult": [1, 2, 2, 2, 2]}},
                data={"image_size": 48},
                discriminator={"kind": "stylegan"},
            ),
            r"power-of-two image size",
        ),
    ],
)
def test_model_dependent_errors(doc: dict, match: str) -> None:
    cfg = parse_config(doc)
    with pytest.raises(ConfigError, match=match):
        check_model(cfg)


def test_lora_targets_checked_against_the_model(tmp_path: Path) -> None:
    import models
    from models.xqgan_cnn import XQGANCNN  # noqa: F401  (registers the family)

    folder = models.save_pretrained(models.create_model("xqgan-v-tiny-64"), tmp_path / "tok")
    ok = parse_config(_doc(model={"init_from": str(folder), "name": ""}, finetune={"encoder": "lora"}))
    assert check_model(ok).quantizer == "lfq"
    bad = parse_config(
        _doc(
            model={"init_from": str(folder), "name": ""},
            finetune={"encoder": "lora", "lora_targets": ["mlp.fc1"]},
        )
    )
    with pytest.raises(ConfigError, match="no Conv2d / Linear under encoder matches"):
        check_model(bad)


SC = {"backbone": "sc", "name": "imagefolder-tiny-64"}


@pytest.mark.parametrize("quantizer, match", [
    ({"kind": "lfq"}, r"quantizes with 'vq' or 'msrq'"),
    ({"levels": 2}, r"no residual stack"),
    ({"entropy_weight": 0.1}, r"LFQ / BSQ setting"),
    ({"dim": 15}, r"not divisible by 2 groups"),
])
def test_sc_quantizer_errors(quantizer: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_model(parse_config(_doc(model=SC, quantizer=quantizer)))


def test_sc_quantizer_menu_maps_to_imagefolder_fields() -> None:
    mcfg = check_model(parse_config(_doc(model=SC, quantizer={"kind": "vq", "groups": 2, "dim": 16,
                                                              "codebook_size": 128, "dropout": 0.1})))
    assert (mcfg.num_branches, mcfg.code_dim, mcfg.codebook_size, mcfg.codebook_drop) == (2, 8, 128, 0.1)
    assert mcfg.scales == (4,)  # vq: one scale, the latent side
    assert check_model(parse_config(_doc(model=SC, quantizer={"kind": "msrq"}))).scales == (1, 2, 3, 4)


def test_sc_lora_targets_the_vit_mlps(tmp_path: Path) -> None:
    import models

    folder = models.save_pretrained(models.create_model("imagefolder-tiny-64"), tmp_path / "sc")
    cfg = load_config(ROOT / "configs" / "xqgan" / "sc-imagefolder-tiny-64.toml")
    cfg = parse_config({**to_dict(cfg), "model": {**to_dict(cfg.model), "init_from": str(folder)}})
    assert check_model(cfg).num_branches == 2
    bad = parse_config({**to_dict(cfg), "finetune": {**to_dict(cfg.finetune), "lora_targets": ["conv1"]}})
    with pytest.raises(ConfigError, match="no Conv2d / Linear under encoder matches"):
        check_model(bad)


def test_defaults_are_a_valid_v_config() -> None:
    cfg = XQGANTrainConfig()
    assert cfg.model.backbone == "v" and check_model(cfg).quantizer == "lfq"


def test_cli_takes_steps_and_out_like_every_training_command(tmp_path: Path, capsys) -> None:
    from training.xqgan.__main__ import main

    config = str(ROOT / "configs" / "xqgan" / "v-lfq-s-64.toml")
    assert main([config, "--check", "--steps", "5", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "run.steps=5 " in out and f"run.out_dir={tmp_path / 'run'}" in out


def test_grids_help_prints_help_and_writes_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    before = {p: p.stat().st_mtime_ns for p in (repo / "docs").glob("*.png")}
    r = subprocess.run([sys.executable, "-m", "training.grids", "--help"], cwd=repo, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "usage: python -m training.grids" in r.stdout, r.stderr
    assert {p: p.stat().st_mtime_ns for p in (repo / "docs").glob("*.png")} == before
