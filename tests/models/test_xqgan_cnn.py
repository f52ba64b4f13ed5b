"""XQ-GAN CNN (V pipeline): LlamaGen VQ-16's key layout and sizes (FORMATS-MAR-XQV.md 2.2, on the meta
device), loading a LlamaGen-layout file with its usage buffers, codes -> latents round trips for every
quantizer of the family, gradient flow, the config checks, and the serving folder round trip. CPU, tiny
sizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.hub import CheckpointError, load_into, load_pretrained, normalize_state_dict, save_pretrained
from models.registry import create_model, get_config
from models.xqgan_cnn import XQGANCNN, XQGANCNNConfig

# A small backbone with the LlamaGen structure, for fast tests (16 px images -> 4x4 latents).
SMALL = dict(
    image_size=16,
    base_channels=16,
    channel_mult=(1, 1, 2),
    enc_res_blocks=2,
    dec_res_blocks=3,
    z_channels=16,
    norm_groups=8,
)


def small(**kw) -> XQGANCNN:
    torch.manual_seed(0)
    return XQGANCNN(XQGANCNNConfig(**{**SMALL, **kw}))


@pytest.fixture(scope="module")
def vq16() -> XQGANCNN:
    with torch.device("meta"):
        return create_model("llamagen-vq16")


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------ published layout


def test_llamagen_vq16_sizes(vq16: XQGANCNN) -> None:
    # FORMATS 2.2: encoder 29.30 M, decoder 42.45 M, 71,899,787 tensors' elements with d 8 and V 16384,
    # the usage buffer (V,) included; ours keeps no persistent usage buffer.
    assert round(_params(vq16.encoder) / 1e6, 2) == 29.30
    assert round(_params(vq16.decoder) / 1e6, 2) == 42.45
    assert _params(vq16) + 16384 == 71_899_787
    assert vq16.code_shape == (256, 1, 1) and vq16.fhat_shape == (8, 16, 16)


def test_llamagen_vq16_keys(vq16: XQGANCNN) -> None:
    sd = vq16.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["encoder.conv_out.weight"] == (256, 512, 3, 3)
    assert shapes["decoder.conv_in.weight"] == (512, 256, 3, 3)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert shapes["quant_conv.weight"] == (8, 256, 1, 1)
    assert shapes["post_quant_conv.weight"] == (256, 8, 1, 1)
    assert shapes["quantize.embedding.weight"] == (16384, 8)
    nin = sorted(k.rsplit(".nin_shortcut", 1)[0] for k in sd if k.endswith("nin_shortcut.weight"))
    assert nin == [
        "decoder.conv_blocks.1.res.0",
        "decoder.conv_blocks.3.res.0",
        "encoder.conv_blocks.2.res.0",
        "encoder.conv_blocks.4.res.0",
    ]
    attn = sorted({k.rsplit(".", 2)[0] for k in sd if ".attn." in k})
    assert attn == [f"decoder.conv_blocks.0.attn.{j}" for j in range(3)] + [
        f"encoder.conv_blocks.4.attn.{j}" for j in range(2)
    ]
    for prefix in ("encoder.conv_blocks.4.attn.0", "encoder.mid.1", "decoder.mid.1"):
        assert {k.split(".")[-2] for k in sd if k.startswith(prefix + ".")} == {
            "norm",
            "q",
            "k",
            "v",
            "proj_out",
        }
    down = sorted(k for k in sd if ".downsample.conv.weight" in k)
    up = sorted(k for k in sd if ".upsample.conv.weight" in k)
    assert down == [f"encoder.conv_blocks.{i}.downsample.conv.weight" for i in range(4)]
    assert up == [f"decoder.conv_blocks.{i}.upsample.conv.weight" for i in range(4)]
    assert {k.split(".")[5] for k in sd if k.startswith("encoder.conv_blocks.0.res.")} == {
        "norm1",
        "conv1",
        "norm2",
        "conv2",
    }
    assert (
        max(int(k.split(".")[4]) for k in sd if k.startswith("decoder.conv_blocks.2.res.")) == 2
    )  # 3 per level
    assert (
        max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.conv_blocks.2.res.")) == 1
    )  # 2 per level
    assert not [k for k in sd if k.startswith("quantize.") and k != "quantize.embedding.weight"]


def test_llamagen_file_with_usage_buffers_loads() -> None:
    src = small(quantizer="vq", codebook_size=32, codebook_dim=4).eval()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["quantize.codebook_used"] = torch.zeros(65536)  # LlamaGen's usage buffer
    sd["quantize.ema_vocab_hit_SV"] = torch.zeros(32)  # XQ-GAN's
    dst = small(quantizer="vq", codebook_size=32, codebook_dim=4).eval()
    torch.manual_seed(5)
    for p in dst.parameters():  # make sure the load changes something
        p.data.normal_()
    load_into(dst, normalize_state_dict({"model": sd, "optimizer": {}}))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(dst.encode(x), src.encode(x))
        torch.testing.assert_close(dst.decode(dst.encode(x)), src.decode(src.encode(x)))
    del sd["decoder.conv_out.weight"]
    with pytest.raises(CheckpointError, match="decoder.conv_out.weight"):
        load_into(dst, sd)


# ---------------------------------------------------------------------------------------------- codes


CASES = {
    "vq": dict(quantizer="vq", codebook_size=32, codebook_dim=4),
    "product_of_residual_lfq": dict(
        quantizer="lfq", codebook_size=0, codebook_dim=8, num_groups=2, num_levels=2
    ),
    "residual_vq": dict(quantizer="vq", codebook_size=32, codebook_dim=4, num_levels=3, cosine=False),
    "product_vq": dict(quantizer="vq", codebook_size=32, codebook_dim=8, num_groups=4),
    "residual_bsq": dict(quantizer="bsq", codebook_size=0, codebook_dim=6, num_levels=2),
    "product_msrq": dict(
        quantizer="msrq", codebook_size=32, codebook_dim=8, num_groups=2, msrq_scales=(1, 2, 4)
    ),
    "product_of_residual_msrq": dict(
        quantizer="msrq", codebook_size=32, codebook_dim=8, num_groups=2, num_levels=2
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_codes_round_trip(name: str) -> None:
    model = small(**CASES[name]).eval()
    cfg = model.config
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        enc = model.encode_full(x)
        codes = model.encode(x)
        assert codes.dtype == torch.int64 and tuple(codes.shape) == (3, *model.code_shape)
        assert list(codes.shape[1:]) == model.code_structure.as_dict()["shape"]
        assert torch.equal(codes, enc.codes)
        assert int(codes.min()) >= 0 and int(codes.max()) < cfg.vocab_size
        torch.testing.assert_close(model.codes_to_fhat(codes), enc.quantized, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.decode(codes), model.decode_fhat(enc.quantized), atol=1e-4, rtol=0)
        rec = model(x).reconstruction
        assert float(model.decode(codes).abs().max()) <= 1.0
        torch.testing.assert_close(model.decode(codes), rec.clamp(-1, 1), atol=1e-4, rtol=0)
    # groups are concatenated along channels: group g's codes decode to channels [g * d/P, (g + 1) * d/P)
    if cfg.num_groups > 1:
        only = codes.clone()
        only[..., 1:] = -1  # drop all groups but the first
        with torch.no_grad():
            z = model.codes_to_fhat(only)
        w = cfg.group_dim
        torch.testing.assert_close(z[:, :w], enc.quantized[:, :w], atol=1e-5, rtol=0)
        assert float(z[:, w:].abs().max()) == 0.0


def test_bad_codes_are_refused() -> None:
    model = small(**CASES["product_of_residual_lfq"]).eval()
    codes = torch.zeros(1, *model.code_shape, dtype=torch.long)
    with pytest.raises(ValueError, match="expected codes"):
        model.decode(codes[:, :-1])
    codes[0, 0, 0, 0] = model.config.vocab_size
    with pytest.raises(ValueError, match="must lie in"):
        model.decode(codes)


def test_positions_are_row_major_grid() -> None:
    model = small(quantizer="vq", codebook_size=32, codebook_dim=4).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        feats = model.quant_conv(model.encoder(x))  # (1, 4, 4, 4)
        codes = model.encode(x)
        row, col = 2, 3
        expect = model.quantize(feats[:, :, row, col]).indices  # the vector at (row, col)
    assert int(codes[0, row * 4 + col, 0, 0]) == int(expect[0])


def test_gradients_reach_encoder_through_quantizer() -> None:
    model = small(**CASES["product_of_residual_lfq"]).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    ((out.reconstruction - x).pow(2).mean() + out.quantizer.loss).backward()
    for name in (
        "encoder.conv_in.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.conv_out.weight",
    ):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and float(g.abs().sum()) > 0, name
    assert model.last_layer is model.decoder.conv_out.weight


def test_quantizer_dropout_codes_decode() -> None:
    model = small(**{**CASES["product_of_residual_lfq"], "quantizer_dropout": 1.0}).train()
    torch.manual_seed(3)
    seen_dropped = False
    for _ in range(8):
        enc = model.encode_full(torch.rand(2, 3, 16, 16) * 2 - 1)
        dropped = enc.codes[:, :, 1] == -1
        seen_dropped |= bool(dropped.any())
        torch.testing.assert_close(model.codes_to_fhat(enc.codes), enc.quantized.detach(), atol=1e-5, rtol=0)
    assert seen_dropped


# ----------------------------------------------------------------------------------------- config / registry


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(image_size=18), "multiple of the downsampling"),
        (dict(quantizer="fsq"), "quantizer 'fsq'"),
        (dict(codebook_dim=7, num_groups=2), "not divisible by num_groups"),
        (dict(quantizer="lfq", codebook_size=100, codebook_dim=8, num_groups=2), "2\\*\\*4 = 16"),
        (dict(quantizer="msrq", msrq_scales=(1, 2, 3)), "must lie in"),
        (dict(norm_groups=5), "multiples of norm_groups"),
    ],
)
def test_config_errors(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        XQGANCNNConfig(**{**SMALL, **bad})


def test_named_configs() -> None:
    tiny, s = get_config("xqgan-v-tiny-64"), get_config("xqgan-v-s-64")
    for cfg in (tiny, s):
        assert (cfg.image_size, cfg.quantizer, cfg.num_groups, cfg.num_levels) == (64, "lfq", 2, 2)
    assert s.latent_side == 8 and s.vocab_size == 1024
    vq16 = get_config("llamagen-vq16")
    assert (vq16.codebook_size, vq16.codebook_dim, vq16.channel_mult, vq16.cosine) == (
        16384,
        8,
        (1, 1, 2, 2, 4),
        True,
    )


def test_serving_folder_round_trip(tmp_path) -> None:
    model = small(**CASES["product_msrq"]).eval()
    folder = save_pretrained(model, tmp_path / "tok")
    loaded = load_pretrained(folder)
    assert isinstance(loaded, XQGANCNN) and loaded.config == model.config
    assert dataclasses.asdict(loaded.config)["msrq_scales"] == (1, 2, 4)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.encode(x))
        torch.testing.assert_close(loaded.decode(model.encode(x)), model.decode(model.encode(x)))
