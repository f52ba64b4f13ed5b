"""KL-16 (MAR's VAE): published key layout and parameter count, shapes, scale, token layout, hub I/O."""

from __future__ import annotations

import re

import pytest
import torch

from models.hub import CheckpointError, load_into, load_pretrained, save_pretrained
from models.kl16 import KL16, KL16Config
from models.registry import create_model, get_config, list_models


def meta_state(cfg: KL16Config) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return KL16(cfg).state_dict()


def tiny_cfg(**kw) -> KL16Config:
    # 2 levels (downsample 2), 32 groups still divide 32/64 channels; attention at 16 px in the encoder.
    return get_config("kl16", image_size=32, ch=32, ch_mult=(1, 2), embed_dim=4, z_channels=4,
                      encoder_attn_resolutions=(16,), **kw)


def test_registered() -> None:
    assert "kl16" in list_models("kl16")
    cfg = get_config("kl16")
    assert (cfg.num_tokens, cfg.token_dim, cfg.latent_scale, cfg.downsample) == (256, 16, 0.2325, 16)


def test_published_key_layout_and_params() -> None:
    sd = meta_state(get_config("kl16"))
    # FORMATS-MAR-XQV 1.7: 312 tensors, 66,456,019 parameters (encoder 28.27 M, decoder 38.19 M)
    assert len(sd) == 312
    assert sum(v.numel() for v in sd.values()) == 66_456_019
    enc = sum(v.numel() for k, v in sd.items() if k.startswith("encoder."))
    dec = sum(v.numel() for k, v in sd.items() if k.startswith("decoder."))
    assert round(enc / 1e6, 2) == 28.27 and round(dec / 1e6, 2) == 38.19
    assert sd["quant_conv.weight"].shape == (32, 32, 1, 1)
    assert sd["post_quant_conv.weight"].shape == (16, 16, 1, 1)
    assert sd["decoder.conv_in.weight"].shape == (512, 16, 3, 3)
    assert sd["decoder.conv_out.weight"].shape == (3, 128, 3, 3)
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert not any("temb" in k for k in sd)
    nin = sorted({k.rsplit(".nin_shortcut", 1)[0] for k in sd if ".nin_shortcut." in k})
    assert nin == ["decoder.up.1.block.0", "decoder.up.3.block.0", "encoder.down.2.block.0",
                   "encoder.down.4.block.0"]
    attn = sorted({re.sub(r"\.(norm|q|k|v|proj_out)\.(weight|bias)$", "", k) for k in sd
                   if re.search(r"\.(attn\.\d+|attn_1)\.q\.weight$", k)})
    assert attn == ["decoder.mid.attn_1", "encoder.down.4.attn.0", "encoder.down.4.attn.1",
                    "encoder.mid.attn_1"]
    down = sorted(k for k in sd if k.endswith("downsample.conv.weight"))
    up = sorted(k for k in sd if k.endswith("upsample.conv.weight"))
    assert down == [f"encoder.down.{i}.downsample.conv.weight" for i in range(4)]
    assert up == [f"decoder.up.{i}.upsample.conv.weight" for i in range(1, 5)]
    assert all(f"decoder.up.{i}.block.2.conv2.weight" in sd for i in range(5))
    assert sd["decoder.up.1.block.0.conv1.weight"].shape == (128, 256, 3, 3)
    assert sd["decoder.up.4.block.0.conv1.weight"].shape == (512, 512, 3, 3)


def test_encode_decode_shapes_and_scale() -> None:
    torch.manual_seed(0)
    model = KL16(tiny_cfg()).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = model.encode_moments(x)
        tokens = model.encode(x)
        spatial = model.encode_spatial(x)
        img = model.decode(tokens)
    assert mean.shape == logvar.shape == (2, 4, 16, 16)
    assert logvar.min() >= -30 and logvar.max() <= 20
    assert tokens.shape == (2, 256, 4)
    torch.testing.assert_close(spatial, mean * 0.2325)
    # token h * W + w holds the channel vector of latent pixel (h, w)
    torch.testing.assert_close(tokens[1, 3 * 16 + 5], spatial[1, :, 3, 5])
    assert img.shape == (2, 3, 32, 32)
    torch.testing.assert_close(img, model.decode_spatial(spatial))
    # decode undoes the scale before post_quant_conv
    with torch.no_grad():
        ref = model.decoder(model.post_quant_conv(mean))
    torch.testing.assert_close(img, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        model.decode(tokens[:, :255])


def test_hub_round_trip_and_stock_checkpoint(tmp_path) -> None:
    torch.manual_seed(1)
    model = KL16(tiny_cfg()).eval()
    save_pretrained(model, tmp_path / "kl")
    again = load_pretrained(tmp_path / "kl")
    assert isinstance(again, KL16) and again.config == model.config
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    # a stock-style {"model": ...} dict with extra LDM loss weights loads; a missing key does not
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = KL16(tiny_cfg())
    load_into(fresh, {**sd, "loss.discriminator.main.0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="missing"):
        load_into(fresh, {k: v for k, v in sd.items() if k != "encoder.conv_in.weight"})


def test_create_model_by_name_small_override() -> None:
    m = create_model("kl16", image_size=32, ch=32, ch_mult=(1, 2), encoder_attn_resolutions=())
    assert isinstance(m, KL16) and m.config.num_tokens == 256
