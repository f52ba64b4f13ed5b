"""Typed training configs: named configurations, dotted overrides, JSON round trip, LR schedule, EMA."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from training import config as C
from training.trainer import EMA, lr_factor


def test_named_configs_build_and_round_trip() -> None:
    assert {"tokenizer-default", "tokenizer-tiny", "generator-default", "generator-tiny", "dit-tiny"} <= set(C.NAMED)
    for name in C.NAMED:
        cfg = C.get_named(name)
        back = C.from_dict(json.loads(json.dumps(C.to_dict(cfg))))
        assert back == cfg and type(back) is type(cfg)
    with pytest.raises(KeyError):
        C.get_named("nope")


def test_dotted_overrides_are_typed() -> None:
    cfg = C.apply_overrides(C.get_named("tokenizer-tiny"), [
        "optim.lr=3e-4", "run.steps=7", "data.crop_scale=[0.8, 1.0]", "data.num_classes=10", "loss.recon=l2",
        "run.max_minutes=null", "model_overrides.tau=0.1", "data.train=/some/folder", "run.bf16=false",
        "optim.warmup_steps=0",
    ])
    assert cfg.optim.lr == 3e-4 and cfg.run.steps == 7 and cfg.data.crop_scale == (0.8, 1.0)
    assert cfg.data.num_classes == 10 and cfg.loss.recon == "l2" and cfg.run.max_minutes is None
    assert cfg.model_overrides["tau"] == 0.1 and cfg.data.train == "/some/folder" and cfg.run.bf16 is False
    assert isinstance(C.apply_overrides(C.get_named("tokenizer-tiny"), ["optim.lr=1"]).optim.lr, float)
    with pytest.raises(KeyError):
        C.apply_overrides(cfg, ["optim.nope=1"])
    with pytest.raises(KeyError):
        C.apply_overrides(cfg, ["nope.lr=1"])
    with pytest.raises(ValueError):
        C.apply_overrides(cfg, ["run.steps=many"])
    with pytest.raises(ValueError):
        C.apply_overrides(cfg, ["run.steps"])


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    opt = C.OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 0.0, opt) == pytest.approx(0.1)
    assert lr_factor(9, 0.0, opt) == pytest.approx(1.0)
    assert lr_factor(10, 0.0, opt) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, opt) == pytest.approx(0.55)
    assert lr_factor(99, 1.0, opt) == pytest.approx(0.1)
    assert lr_factor(500, 3.0, opt) == pytest.approx(0.1)


def test_ema_tracks_the_model() -> None:
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.model.weight.clone()
    for _ in range(50):
        ema.update(model)
    assert not torch.equal(before, ema.model.weight)
    torch.testing.assert_close(ema.model.weight, model.weight)
    assert dataclasses.is_dataclass(C.RunConfig())


def test_tokenizer_option_records_that_tokenizer_not_the_configs_default(tmp_path) -> None:
    """``--tokenizer runs/x/export`` on a config whose export names ``default-tokenizer``: the export names the
    given folder as the server will (``x-export``) and the sha256 of its weights; the server pairs by that."""
    import models
    from models.hub import weights_sha256
    from training.__main__ import _train_config, build_parser
    from training.generator import build_generator

    folder = tmp_path / "runs" / "x" / "export"
    torch.manual_seed(0)
    models.save_pretrained(models.create_model("softvq-tiny-64"), folder)
    args = build_parser().parse_args(["generator", "--config", "generator-tiny", "--tokenizer", str(folder),
                                      "model=sit-tiny-64x32", "tokenizer_ref=default-tokenizer"])
    assert _train_config(args, "generator").tokenizer_ref == "default-tokenizer"  # an explicit ref is kept
    args = build_parser().parse_args(["generator", "--config", "generator-default", "--tokenizer", str(folder),
                                      "model=sit-tiny-64x32"])
    cfg = _train_config(args, "generator")
    assert C.get_named("generator-default").tokenizer_ref == "default-tokenizer"
    assert cfg.tokenizer_ref == "x-export"
    gen = build_generator(cfg, [1, 2], cfg.tokenizer_ref)
    assert gen.config.tokenizer == "x-export" and gen.config.tokenizer_sha256 == weights_sha256(folder)
    assert len(gen.config.tokenizer_sha256) == 64
