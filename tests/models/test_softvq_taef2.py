"""SoftVQ on the frozen TAEF2 (models/softvq_taef2.py): shapes, the latent-space path equals the image path,
the folder round trip (TAEF2 weights included), and the configuration checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models
from models.softvq_taef2 import SoftVQTAEF2, SoftVQTAEF2Config, sincos_2d
from models.taef2 import DEFAULT_WEIGHTS, TAEF2

HAVE_TAEF2 = (Path(DEFAULT_WEIGHTS) / "taef2_encoder.pth").exists()


@pytest.fixture(scope="module")
def tiny() -> SoftVQTAEF2:
    torch.manual_seed(0)
    model = models.create_model("softvq-taef2-tiny", latent_shift=0.08, latent_scale=1.1)
    if HAVE_TAEF2:
        model.vae.load_state_dict(TAEF2.from_original().state_dict())
    return model.eval()


def test_named_configs_and_trainable_parts() -> None:
    for name, shape in (("softvq-taef2-32", (32, 32)), ("softvq-taef2-32x64", (32, 64)), ("softvq-taef2-tiny", (32, 16))):
        cfg = models.get_config(name)
        assert (cfg.num_tokens, cfg.token_dim) == shape and cfg.image_size == 64
    m = models.create_model("softvq-taef2-tiny")
    assert m.kind == "continuous" and m.image_size == 64 and m.token_shape == (32, 16)
    assert m.latent_grid_shape == (32, 8, 8)
    assert not any(p.requires_grad for p in m.vae.parameters())
    assert all(p.requires_grad for n, p in m.named_parameters() if not n.startswith("vae."))
    m.train()
    assert m.training and not m.vae.training  # the stem stays in eval mode


def test_encode_decode_shapes_and_the_latent_path(tiny: SoftVQTAEF2, images64: torch.Tensor) -> None:
    with torch.no_grad():
        tokens = tiny.encode(images64)
        assert tokens.shape == (2, 32, 16) and tokens.dtype == torch.float32
        images = tiny.decode(tokens)
        assert images.shape == (2, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
        # image path == TAEF2 encoder, then the latent-space tokenizer (what training uses)
        latents = tiny.vae.encode_spatial(images64)
        torch.testing.assert_close(tiny.encode_latents(latents, compute_losses=False).tokens, tokens)
        torch.testing.assert_close(tiny.vae.decode_spatial(tiny.decode_latents(tokens)), images)
        # the grid normalisation is invertible
        torch.testing.assert_close(tiny.latents_from_grid(tiny.grid_from_latents(latents)), latents)
    assert tiny.grid_from_latents(latents).shape == (2, 64, 32)


def test_rows_are_independent_of_their_batch(tiny: SoftVQTAEF2, images64: torch.Tensor) -> None:
    with torch.no_grad():
        both = tiny.encode(images64)
        one = tiny.encode(images64[1:])
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=0)


def test_bad_shapes_are_refused(tiny: SoftVQTAEF2) -> None:
    with pytest.raises(ValueError, match="expected images"):
        tiny.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="expected tokens"):
        tiny.decode(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="expected TAEF2 latents"):
        tiny.encode_latents(torch.zeros(1, 16, 8, 8))
    with pytest.raises(ValueError, match="num_tokens"):
        SoftVQTAEF2Config(num_tokens=30, num_codebooks=4)
    with pytest.raises(ValueError, match="latent_scale"):
        SoftVQTAEF2Config(latent_scale=0.0)


def test_folder_round_trip_keeps_the_stem(tmp_path, tiny: SoftVQTAEF2, images64: torch.Tensor) -> None:
    out = models.save_pretrained(tiny, tmp_path / "tok")
    back = models.load_pretrained(out)
    assert isinstance(back, SoftVQTAEF2) and back.config == tiny.config
    for k, v in tiny.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert any(k.startswith("vae.decoder.") for k in back.state_dict())
    with torch.no_grad():
        assert torch.equal(back.encode(images64), tiny.encode(images64))
    # fp16 folders (what ships) load as float32 and stay close
    half = models.load_pretrained(models.save_pretrained(tiny, tmp_path / "half", dtype=torch.float16))
    with torch.no_grad():
        torch.testing.assert_close(half.encode(images64), tiny.encode(images64), atol=2e-2, rtol=0)


@pytest.mark.skipif(not HAVE_TAEF2, reason="shared TAEF2 weights not present")
def test_with_taef2_stands_on_the_pretrained_weights() -> None:
    m = SoftVQTAEF2.with_taef2(models.get_config("softvq-taef2-tiny"))
    ref = TAEF2.from_original()
    for k, v in ref.state_dict().items():
        assert torch.equal(m.vae.state_dict()[k], v), k


def test_sincos_table() -> None:
    t = sincos_2d(8, 16)
    assert t.shape == (64, 16)
    # rows share the row half; columns share the column half
    torch.testing.assert_close(t[0, :8], t[7, :8])
    torch.testing.assert_close(t[0, 8:], t[8, 8:])
    with pytest.raises(ValueError):
        sincos_2d(8, 10)


def test_pair_skip_links_each_token_to_its_grid_positions(tmp_path) -> None:
    """With ``pair_skip`` the linear path carries grid positions 2i, 2i+1 to token i and back: with the ViT
    halves silenced, a change of one grid vector moves only its own token and only its own two positions."""
    torch.manual_seed(0)
    m = models.create_model("softvq-taef2-tiny", pair_skip=True).eval()
    assert m.config.positions_per_token == 2
    assert {"skip_in.weight", "skip_out.bias"} <= set(m.state_dict())
    assert "skip_in.weight" not in models.create_model("softvq-taef2-tiny").state_dict()
    with torch.no_grad():
        for lin in (m.quant_conv, m.decoder.to_latent):
            lin.weight.zero_()
            lin.bias.zero_()
        z = torch.randn(1, 32, 8, 8)
        z2 = z.clone()
        z2[0, :, 2, 5] += 1.0  # raster position 21 -> token 10
        f1, f2 = m.encode_latents(z, False).features, m.encode_latents(z2, False).features
        moved = (f1 - f2).abs().sum(-1)[0]
        assert moved[10] > 0 and moved.count_nonzero() == 1
        tokens = torch.zeros(1, 32, 16)
        t2 = tokens.clone()
        t2[0, 10] = 1.0
        g = (m.decode_grid(tokens) - m.decode_grid(t2)).abs().sum(-1)[0]
        assert set(g.nonzero().flatten().tolist()) == {20, 21}
    back = models.load_pretrained(models.save_pretrained(m, tmp_path / "skip"))
    assert back.config.pair_skip and torch.equal(back.skip_in.weight, m.skip_in.weight)
    with pytest.raises(ValueError, match="pair_skip"):
        models.get_config("softvq-taef2-tiny", pair_skip=True, num_tokens=24, num_codebooks=1)
