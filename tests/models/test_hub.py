"""Checkpoint I/O for the SoftVQ family: our folders, released HF folders, training dicts, refusals."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import models.softvq as softvq
from models.hub import CheckpointError, PickleRefused, load_pretrained, read_config, save_pretrained
from models.registry import get_config
from models.softvq import SoftVQModel


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _released_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The published file layout: flat, no decoder.model.patch_embed.*, with quantize.codebook_used."""
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("decoder.model.patch_embed.")}


def test_save_then_load_is_bit_exact(tmp_path: Path, tiny_softvq: SoftVQModel, images64: torch.Tensor) -> None:
    save_pretrained(tiny_softvq, tmp_path / "tok")
    assert (tmp_path / "tok" / "config.json").exists() and (tmp_path / "tok" / "model.safetensors").exists()
    loaded = load_pretrained(tmp_path / "tok")
    assert isinstance(loaded, SoftVQModel) and loaded.config == tiny_softvq.config and not loaded.training
    _assert_same_weights(tiny_softvq, loaded)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images64), tiny_softvq.encode(images64))


def test_sharded_save_loads(tmp_path: Path, tiny_softvq: SoftVQModel) -> None:
    save_pretrained(tiny_softvq, tmp_path / "tok", max_shard_bytes=2_000_000)
    assert (tmp_path / "tok" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "tok").glob("model-*-of-*.safetensors"))) > 1
    _assert_same_weights(tiny_softvq, load_pretrained(tmp_path / "tok"))


def test_missing_decoder_patch_embed_and_usage_history(tmp_path: Path, tiny_softvq: SoftVQModel,
                                                       images64: torch.Tensor) -> None:
    save_pretrained(tiny_softvq, tmp_path / "tok")
    sd = _released_state_dict(tiny_softvq)
    sd["quantize.codebook_used"] = torch.randint(0, 256, sd["quantize.codebook_used"].shape).float()
    save_file(sd, str(tmp_path / "tok" / "model.safetensors"))
    loaded = load_pretrained(tmp_path / "tok")
    assert torch.equal(loaded.quantize.codebook_used, sd["quantize.codebook_used"])
    del sd["quantize.codebook_used"]
    save_file(sd, str(tmp_path / "tok" / "model.safetensors"))
    loaded = load_pretrained(tmp_path / "tok")
    with torch.no_grad():  # the decoder patch embedding is unused, so outputs are unchanged
        torch.testing.assert_close(loaded(images64).reconstruction, tiny_softvq(images64).reconstruction,
                                   atol=0, rtol=0)


def test_wrong_shape_names_the_key(tmp_path: Path, tiny_softvq: SoftVQModel) -> None:
    save_pretrained(tiny_softvq, tmp_path / "tok")
    sd = tiny_softvq.state_dict()
    sd["quant_conv.weight"] = torch.zeros(16, 128)
    save_file(dict(sd), str(tmp_path / "tok" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"quant_conv\.weight.*\(16, 128\).*\(32, 128\)"):
        load_pretrained(tmp_path / "tok")


def test_unexpected_and_missing_keys_are_named(tmp_path: Path, tiny_softvq: SoftVQModel) -> None:
    save_pretrained(tiny_softvq, tmp_path / "tok")
    sd = dict(tiny_softvq.state_dict())
    sd["encoder.extra_head.weight"] = torch.zeros(2)
    sd["repa_model.blocks.0.weight"] = torch.zeros(2)  # a known training-only extra: ignored
    del sd["encoder.latent_tokens"]
    save_file(sd, str(tmp_path / "tok" / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_pretrained(tmp_path / "tok")
    msg = str(err.value)
    assert "encoder.extra_head.weight" in msg and "encoder.latent_tokens" in msg and "repa_model" not in msg


def _training_dict(model: SoftVQModel) -> tuple[dict, dict[str, torch.Tensor]]:
    raw = model.state_dict()
    ema = {k: v + 1.0 for k, v in raw.items()}
    ckpt = {
        "model": {f"module._orig_mod.{k}": v for k, v in raw.items()},
        "ema": {f"_orig_mod.{k}": v for k, v in ema.items()},
        "optimizer": {"state": {}, "param_groups": []},
        "steps": 10,
    }
    return ckpt, ema


def test_training_dict_pickle_needs_opt_in_and_prefers_ema(tmp_path: Path, tiny_softvq: SoftVQModel) -> None:
    save_pretrained(tiny_softvq, tmp_path / "tok")
    ckpt, ema = _training_dict(tiny_softvq)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(PickleRefused):
        load_pretrained(tmp_path / "tok", weights=tmp_path / "ckpt.pt")
    loaded = load_pretrained(tmp_path / "tok", weights=tmp_path / "ckpt.pt", allow_pickle=True)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k
    ckpt["args"] = argparse.Namespace(lr=1e-4)  # official training dicts pickle their argparse namespace
    torch.save(ckpt, tmp_path / "ckpt_args.pt")
    # the weights-only loader refuses the namespace; full unpickling is a separate, explicit opt-in
    with pytest.raises(PickleRefused, match="unsafe_unpickle"):
        load_pretrained(tmp_path / "tok", weights=tmp_path / "ckpt_args.pt", allow_pickle=True)
    loaded = load_pretrained(tmp_path / "tok", weights=tmp_path / "ckpt_args.pt", allow_pickle=True,
                             unsafe_unpickle=True)
    assert torch.equal(loaded.quant_conv.weight, ema["quant_conv.weight"])


def test_prefixed_safetensors_weights_load(tmp_path: Path, tiny_softvq: SoftVQModel) -> None:
    save_pretrained(tiny_softvq, tmp_path / "tok")
    sd = {f"module._orig_mod.{k}": v.clone() for k, v in tiny_softvq.state_dict().items()}
    save_file(sd, str(tmp_path / "ema.safetensors"))
    _assert_same_weights(tiny_softvq, load_pretrained(tmp_path / "tok", weights=tmp_path / "ema.safetensors"))


# ---------------------------------------------------------------------------------- the official config.json

OFFICIAL_L32 = {  # the ModelArgs fields of SoftVQVAE/softvq-l-32 (FORMATS.md 1.2), incl. training-only ones
    "image_size": 256, "base_image_size": 256, "codebook_size": 8192, "codebook_embed_dim": 64,
    "codebook_l2_norm": True, "codebook_show_usage": True, "commit_loss_beta": 0.25, "entropy_loss_ratio": 0.0,
    "vq_loss_ratio": 1.0, "kl_loss_weight": 1e-06, "tau": 0.07, "num_codebooks": 4,
    "enc_type": "vit", "dec_type": "vit", "encoder_model": "vit_base_patch14_dinov2.lvd142m",
    "decoder_model": "vit_large_patch14_dinov2.lvd142m", "num_latent_tokens": 32,
    "enc_tuning_method": "full", "dec_tuning_method": "full", "enc_pretrained": True, "dec_pretrained": False,
    "enc_patch_size": 16, "dec_patch_size": 16, "enc_drop_path_rate": 0.0, "dec_drop_path_rate": 0.0,
    "repa": False, "repa_patch_size": 16, "repa_model": "vit_large_patch14_dinov2.lvd142m", "repa_proj_dim": 1024,
    "repa_loss_weight": 0.1, "repa_align": "repeat", "vq_mean": 0.00060894643, "vq_std": 0.029030401,
    "repa_layer_indices": [5, 11],
}
ARCH_FIELDS = ("image_size", "patch_size", "num_tokens", "token_dim", "enc_width", "enc_depth", "enc_heads",
               "dec_width", "dec_depth", "dec_heads", "mlp_ratio", "codebook_size", "num_codebooks", "tau",
               "quantizer", "vq_mean", "vq_std")


@pytest.mark.parametrize("name,overrides", [
    ("softvq-l-32", {}),
    ("softvq-bl-64", {"codebook_embed_dim": 32, "num_latent_tokens": 64, "vq_mean": -0.00077168207,
                      "vq_std": 0.07157949}),
    ("softvq-l-64", {"codebook_embed_dim": 32, "num_latent_tokens": 64, "encoder_model": "vit_large_patch14_dinov2",
                     "vq_mean": 0.0009714666, "vq_std": 0.07259091}),
    ("softvq-l-32-512", {"image_size": 512, "enc_patch_size": [16, 16], "dec_patch_size": [16, 16],
                         "vq_mean": -0.0011922447, "vq_std": 0.028908715}),
])
def test_official_config_translates(tmp_path: Path, name: str, overrides: dict) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**OFFICIAL_L32, **overrides}))
    cls, cfg = read_config(tmp_path)
    assert cls is SoftVQModel
    ours = get_config(name)
    assert {f: getattr(cfg, f) for f in ARCH_FIELDS} == {f: getattr(ours, f) for f in ARCH_FIELDS}


@pytest.mark.parametrize("bad,match", [
    ({"use_rope": True}, "use_rope"), ({"to_pixel": "conv"}, "to_pixel"), ({"dec_type": "cnn"}, "dec_type"),
    ({"decoder_model": "vit_giant_patch14_dinov2.lvd142m"}, "decoder_model"),
    ({"dec_patch_size": 8}, "patch_size"),
    ({"use_ape": False}, "use_ape=false"), ({"enc_tuning_method": "lora"}, "enc_tuning_method='lora'"),
    ({"dec_tuning_method": "lora"}, "dec_tuning_method='lora'"), ({"dec_cls_token": False}, "dec_cls_token"),
    ({"enc_type": "cnn"}, "enc_type"),
    ({"enc_token_drop": 0.4}, "enc_token_drop=0.4"), ({"aux_hog_dec": True}, "aux_hog_dec=True"),
])
def test_official_config_refuses_unsupported(bad: dict, match: str) -> None:
    """Each refused field (or value) raises, naming it; through the dispatcher too (no other family takes it)."""
    from models.official import config_from_official

    with pytest.raises(ValueError, match=re.escape(match)):
        softvq.SoftVQConfig.from_official({**OFFICIAL_L32, **bad})
    with pytest.raises(ValueError, match=re.escape(match)):
        config_from_official({**OFFICIAL_L32, **bad})


def test_official_config_fields_are_all_listed() -> None:
    """Every field of the released config is honoured or ignored with a reason in the one table."""
    from models.official import HONOURED, OFFICIAL_FIELDS, ignored_official_fields

    assert set(OFFICIAL_L32) <= set(OFFICIAL_FIELDS["softvq"])
    ignored = ignored_official_fields("softvq", OFFICIAL_L32)
    assert "enc_pretrained" in ignored and "repa_model" in ignored and "vq_mean" not in ignored
    assert all(reason and reason != HONOURED for reason in ignored.values())


def test_official_config_without_latent_stats_warns(caplog: pytest.LogCaptureFixture) -> None:
    d = {k: v for k, v in OFFICIAL_L32.items() if k not in ("vq_mean", "vq_std")}
    with caplog.at_level(logging.WARNING, logger="models.softvq"):
        cfg = softvq.SoftVQConfig.from_official(d)
    assert (cfg.vq_mean, cfg.vq_std) == (0.0, 1.0)
    assert len(cfg.load_warnings) == 1 and "vq_mean / vq_std" in cfg.load_warnings[0]
    assert any("vq_mean / vq_std" in r.getMessage() for r in caplog.records)
    assert softvq.SoftVQConfig.from_official(OFFICIAL_L32).load_warnings == ()


def test_released_folder_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images64: torch.Tensor) -> None:
    """A Hugging Face folder as released (ModelArgs config.json + flat model.safetensors without the decoder
    patch embedding) loads through ``load_pretrained``; a tiny backbone name stands in for DINOv2-B/L."""
    monkeypatch.setitem(softvq.OFFICIAL_VITS, "vit_tinytest_patch14_dinov2", (64, 2, 2))
    official = {**OFFICIAL_L32, "image_size": 64, "enc_patch_size": 8, "dec_patch_size": 8,
                "encoder_model": "vit_tinytest_patch14_dinov2.lvd142m",
                "decoder_model": "vit_tinytest_patch14_dinov2.lvd142m",
                "codebook_size": 32, "num_latent_tokens": 16, "codebook_embed_dim": 8}
    cfg = softvq.SoftVQConfig.from_official(official)
    torch.manual_seed(0)
    source = SoftVQModel(cfg).eval()
    folder = tmp_path / "softvq-release"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(official))
    save_file(_released_state_dict(source), str(folder / "model.safetensors"))
    loaded = load_pretrained(folder)
    assert loaded.token_shape == (16, 8) and loaded.vq_std == OFFICIAL_L32["vq_std"]
    with torch.no_grad():
        assert torch.equal(loaded.encode(images64), source.encode(images64))
    # saving it again writes our own format, which loads the same way
    save_pretrained(loaded, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["class_name"] == "SoftVQModel"
    _assert_same_weights(loaded, load_pretrained(tmp_path / "ours"))


def test_select_one_model_of_a_nested_checkpoint(tmp_path) -> None:
    """VAR releases hold two models in one file (``trainer.var_wo_ddp`` / ``trainer.vae_local``)."""
    import torch

    from models.hub import CheckpointError, read_state_dict

    a = {"w": torch.randn(2, 3)}
    b = {"module.v": torch.randn(4)}
    path = tmp_path / "ar-ckpt-last.pth"
    torch.save({"trainer": {"var_wo_ddp": a, "vae_local": b}, "args": {"depth": 17}}, path)
    assert torch.equal(read_state_dict(path, allow_pickle=True, select="trainer.var_wo_ddp")["w"], a["w"])
    assert torch.equal(read_state_dict(path, allow_pickle=True, select="trainer.vae_local")["v"], b["module.v"])
    with pytest.raises(CheckpointError, match="trainer.gpt"):
        read_state_dict(path, allow_pickle=True, select="trainer.gpt")
