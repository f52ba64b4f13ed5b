"""SoftVQ-VAE: published key layouts (meta device), numerics against an independent reference, shapes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from models.layers.vit import Attention, set_fused_attention, unpatchify
from models.registry import config_from_dict, config_to_dict, create_model, describe, get_config, list_models
from models.softvq import SoftVQConfig, SoftVQModel

B_VIT = (768, 12)
L_VIT = (1024, 24)
# FORMATS.md 1.2: name -> (encoder (width, depth), decoder, image size, tokens, token dim, vq_mean, vq_std)
PUBLISHED = {
    "softvq-l-64": (L_VIT, L_VIT, 256, 64, 32, 0.0009714666, 0.07259091),
    "softvq-bl-64": (B_VIT, L_VIT, 256, 64, 32, -0.00077168207, 0.07157949),
    "softvq-b-64": (B_VIT, B_VIT, 256, 64, 32, -0.003192751, 0.07235257),
    "softvq-l-32": (B_VIT, L_VIT, 256, 32, 64, 0.00060894643, 0.029030401),
    "softvq-bl-32": (B_VIT, L_VIT, 256, 32, 64, 0.0010870857, 0.028672216),
    "softvq-b-32": (B_VIT, B_VIT, 256, 32, 64, -0.0001770356, 0.029009325),
    "softvq-bl-64-512": (B_VIT, L_VIT, 512, 64, 32, -0.0021498345, 0.073663734),
    "softvq-l-32-512": (B_VIT, L_VIT, 512, 32, 64, -0.0011922447, 0.028908715),
}
# Published model.safetensors sizes (FORMATS.md 1.2/1.4); released files lack decoder.model.patch_embed.*.
PUBLISHED_SIZE = {"softvq-l-64": "2.43 GB", "softvq-l-32": "1.57 GB", "softvq-b-32": "697.04 MB",
                  "softvq-bl-64-512": "1.57 GB", "softvq-l-32-512": "1.57 GB"}
SMALL = ["softvq-tiny-64", "softvq-s-64", "softvq-s-32"]


def _vit_layout(prefix: str, width: int, depth: int, n_img: int, p: int) -> dict[str, tuple[int, ...]]:
    d = width
    out: dict[str, tuple[int, ...]] = {
        f"{prefix}.cls_token": (1, 1, d), f"{prefix}.pos_embed": (1, 1 + n_img, d),
        f"{prefix}.patch_embed.proj.weight": (d, 3, p, p), f"{prefix}.patch_embed.proj.bias": (d,),
        f"{prefix}.norm.weight": (d,), f"{prefix}.norm.bias": (d,),
    }
    for i in range(depth):
        b = f"{prefix}.blocks.{i}"
        out.update({
            f"{b}.norm1.weight": (d,), f"{b}.norm1.bias": (d,),
            f"{b}.attn.qkv.weight": (3 * d, d), f"{b}.attn.qkv.bias": (3 * d,),
            f"{b}.attn.proj.weight": (d, d), f"{b}.attn.proj.bias": (d,), f"{b}.ls1.gamma": (d,),
            f"{b}.norm2.weight": (d,), f"{b}.norm2.bias": (d,),
            f"{b}.mlp.fc1.weight": (4 * d, d), f"{b}.mlp.fc1.bias": (4 * d,),
            f"{b}.mlp.fc2.weight": (d, 4 * d), f"{b}.mlp.fc2.bias": (d,), f"{b}.ls2.gamma": (d,),
        })
    return out


def _expected_layout(enc, dec, img, tokens, dim, p=16, k=4, v=8192) -> dict[str, tuple[int, ...]]:
    n_img = (img // p) ** 2
    (de, ne), (dd, nd) = enc, dec
    out = {"encoder.latent_tokens": (1, tokens, de), "encoder.latent_pos_embed": (1, tokens, de)}
    out.update(_vit_layout("encoder.model", de, ne, n_img, p))
    out.update({
        "quant_conv.weight": (dim, de), "quant_conv.bias": (dim,),
        "quantize.embedding": (k, v, dim), "quantize.codebook_used": (k, 65536),
        "post_quant_conv.weight": (dd, dim), "post_quant_conv.bias": (dd,),
        "decoder.mask_token": (1, 1, dd), "decoder.latent_pos_embed": (1, tokens, dd),
        "decoder.to_pixel.model.weight": (3 * p * p, dd), "decoder.to_pixel.model.bias": (3 * p * p,),
    })
    out.update(_vit_layout("decoder.model", dd, nd, n_img, p))
    return out


def _fmt_size(nbytes: int, unit: str) -> str:
    return f"{nbytes / 1e6:.2f} MB" if unit == "MB" else f"{nbytes / 1e9:.2f} GB"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_key_layout(name: str) -> None:
    enc, dec, img, tokens, dim, mean, std = PUBLISHED[name]
    with torch.device("meta"):
        model = create_model(name)
    sd = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expected = _expected_layout(enc, dec, img, tokens, dim)
    assert sorted(set(shapes) - set(expected)) == [] and sorted(set(expected) - set(shapes)) == []
    assert shapes == expected
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert (model.vq_mean, model.vq_std) == (mean, std)
    assert model.token_shape == (tokens, dim) and model.image_size == img and model.kind == "continuous"
    nbytes = sum(v.numel() * 4 for v in sd.values())
    if name == "softvq-l-64":
        assert len(sd) == 696 and nbytes == 2_436_746_368
    if name in ("softvq-l-32", "softvq-bl-32"):
        assert round(nbytes / 1e9, 4) == 1.5705
    if name in PUBLISHED_SIZE:
        released = nbytes - sum(v.numel() * 4 for k, v in sd.items() if k.startswith("decoder.model.patch_embed."))
        assert _fmt_size(released, PUBLISHED_SIZE[name][-2:]) == PUBLISHED_SIZE[name]


def test_registry_lists_every_name_with_a_description() -> None:
    names = set(list_models("softvq"))
    assert set(PUBLISHED) | set(SMALL) <= names
    assert all(describe(n) for n in names)
    l32 = get_config("softvq-l-32")  # the published "L-32" is a B encoder with an L decoder
    assert (l32.enc_width, l32.enc_depth, l32.dec_width, l32.dec_depth) == (768, 12, 1024, 24)


@pytest.mark.parametrize("name", sorted(PUBLISHED) + SMALL)
def test_config_json_roundtrip(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    d = config_to_dict(model)
    assert d["class_name"] == "SoftVQModel"
    cls, cfg = config_from_dict(d)
    assert cls is SoftVQModel and cfg == model.config


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="num_codebooks"):
        SoftVQConfig(num_tokens=30, num_codebooks=4)
    with pytest.raises(ValueError, match="quantizer"):
        SoftVQConfig(quantizer="lfq")


@pytest.mark.parametrize("name", SMALL)
def test_small_configs_encode_decode(name: str, images64: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    cfg = model.config
    assert (cfg.image_size, cfg.patch_size) == (64, 8)
    with torch.no_grad():
        tokens = model.encode(images64)
        recon = model.decode(tokens)
        out = model(images64)
    assert tokens.shape == (2, *model.token_shape) and tokens.dtype == torch.float32
    assert float(tokens.norm(dim=-1).max()) <= 1 + 1e-5  # convex combinations of unit codewords
    assert recon.shape == (2, 3, 64, 64) and bool(torch.isfinite(recon).all())
    assert float(recon.std()) < 0.5  # the pixel head starts near zero (mid-grey), unclamped
    torch.testing.assert_close(out.reconstruction, recon)
    torch.testing.assert_close(out.tokens, tokens)
    q = out.quantizer
    assert set(q.losses) == {"entropy"} and q.sample_entropy is not None and q.avg_entropy is not None
    torch.testing.assert_close(q.losses["entropy"], q.sample_entropy - q.avg_entropy)  # weight 1 by default
    with torch.no_grad():  # a row's tokens do not depend on the rest of its batch
        torch.testing.assert_close(model.encode(images64[1:]), tokens[1:], atol=1e-5, rtol=0)


def test_encode_full_and_latent_normalisation(tiny_softvq: SoftVQModel, images64: torch.Tensor) -> None:
    model = SoftVQModel(dataclasses.replace(tiny_softvq.config, vq_mean=0.1, vq_std=0.5))
    model.load_state_dict(tiny_softvq.state_dict())
    enc = model.encode_full(images64)
    assert enc.features.shape == enc.tokens.shape == (2, 64, 32)
    assert enc.quantizer.indices.shape == (2, 4, 16) and enc.quantizer.probs.shape == (2, 64, 256)
    z = model.normalize_latents(enc.tokens)
    torch.testing.assert_close(z, (enc.tokens - 0.1) / 0.5)
    torch.testing.assert_close(model.denormalize_latents(z), enc.tokens)


def test_shape_errors(tiny_softvq: SoftVQModel) -> None:
    with pytest.raises(ValueError, match="expected images"):
        tiny_softvq.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="expected tokens"):
        tiny_softvq.decode(torch.zeros(1, 32, 64))


def test_unpatchify_layout() -> None:
    p, c = 4, 3
    x = torch.zeros(1, 4, p * p * c)  # a 2x2 grid of patches
    patch, pi, qi, ci = 3, 1, 2, 2  # patch (row 1, col 1), in-patch row 1, col 2, channel 2
    x[0, patch, (pi * p + qi) * c + ci] = 1.0
    img = unpatchify(x, p, c)
    assert img.shape == (1, c, 2 * p, 2 * p)
    assert img.sum() == 1 and img[0, ci, 1 * p + pi, 1 * p + qi] == 1


def test_sdpa_matches_explicit_attention() -> None:
    torch.manual_seed(0)
    attn = Attention(96, 6)
    x = torch.randn(3, 50, 96)
    fused = attn(x)
    attn.fused = False
    explicit = attn(x)
    diff = float((fused - explicit).detach().abs().max())
    assert diff < 1e-6, diff


# ------------------------------------------------------------------ independent fp32 reference of the published code


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights of realistic scale everywhere (LayerScale near 1, so every block matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif ".norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("embedding"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * w + b


def _ref_vit(sd: dict, pre: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    depth = len({k.split(".")[3] for k in sd if k.startswith(f"{pre}.blocks.")})
    for i in range(depth):
        w = {k[len(f"{pre}.blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"{pre}.blocks.{i}.")}
        bsz, n, d = x.shape
        hd = d // heads
        h = _ln(x, w["norm1.weight"], w["norm1.bias"])
        qkv = h @ w["attn.qkv.weight"].T + w["attn.qkv.bias"]
        q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(bsz, n, heads, hd).transpose(1, 2) for j in range(3))
        a = torch.softmax((q * hd**-0.5) @ k.transpose(-1, -2), dim=-1) @ v
        a = a.transpose(1, 2).reshape(bsz, n, d) @ w["attn.proj.weight"].T + w["attn.proj.bias"]
        x = x + w["ls1.gamma"] * a
        h = _ln(x, w["norm2.weight"], w["norm2.bias"]) @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + w["ls2.gamma"] * (h @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"])
    return _ln(x, sd[f"{pre}.norm.weight"], sd[f"{pre}.norm.bias"])


def _ref_encode(sd: dict, cfg: SoftVQConfig, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-quantization features, tokens), both (B, L, d)."""
    bsz, c, hh, ww = img.shape
    p = cfg.patch_size
    gh, gw = hh // p, ww // p
    patches = img.reshape(bsz, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(bsz, gh * gw, c * p * p)
    wproj = sd["encoder.model.patch_embed.proj.weight"]
    x = patches @ wproj.reshape(wproj.shape[0], -1).T + sd["encoder.model.patch_embed.proj.bias"]
    x = torch.cat([sd["encoder.model.cls_token"].expand(bsz, -1, -1), x], 1) + sd["encoder.model.pos_embed"]
    lat = sd["encoder.latent_tokens"] + sd["encoder.latent_pos_embed"]
    x = torch.cat([x, lat.expand(bsz, -1, -1)], 1)
    x = _ref_vit(sd, "encoder.model", x, cfg.enc_heads)[:, -cfg.num_tokens:]
    h = x @ sd["quant_conv.weight"].T + sd["quant_conv.bias"]
    kq = cfg.num_codebooks
    seg = h.reshape(bsz, kq, cfg.num_tokens // kq, cfg.token_dim)
    seg = seg / seg.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    emb = sd["quantize.embedding"]
    emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = torch.stack([torch.softmax(seg[:, k] @ emb[k].T / cfg.tau, -1) @ emb[k] for k in range(kq)], 1)
    return h, out.reshape(bsz, cfg.num_tokens, cfg.token_dim)


def _ref_decode(sd: dict, cfg: SoftVQConfig, z: torch.Tensor) -> torch.Tensor:
    bsz = z.shape[0]
    p, n = cfg.patch_size, cfg.num_patches
    g = int(math.isqrt(n))
    z = z @ sd["post_quant_conv.weight"].T + sd["post_quant_conv.bias"]
    x = sd["decoder.mask_token"].expand(bsz, n, -1)
    x = torch.cat([sd["decoder.model.cls_token"].expand(bsz, -1, -1), x], 1) + sd["decoder.model.pos_embed"]
    x = torch.cat([x, z + sd["decoder.latent_pos_embed"]], 1)
    x = _ref_vit(sd, "decoder.model", x, cfg.dec_heads)[:, 1:1 + n]
    pix = x @ sd["decoder.to_pixel.model.weight"].T + sd["decoder.to_pixel.model.bias"]  # (B, N, p*p*3)
    img = torch.zeros(bsz, 3, g * p, g * p)
    for idx in range(n):  # patch vector ordered (row, col, channel), channel last
        r, c = divmod(idx, g)
        img[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = pix[:, idx].reshape(bsz, p, p, 3).permute(0, 3, 1, 2)
    return img


@pytest.mark.parametrize("fused", [True, False])
def test_matches_independent_reference(fused: bool, images64: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = create_model("softvq-tiny-64", tau=0.5).eval()  # a softer posterior keeps the comparison smooth
    _randomize(model)
    set_fused_attention(model, fused)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        enc = model.encode_full(images64)
        ref_features, ref_tokens = _ref_encode(sd, model.config, images64)
        assert float(ref_tokens.std()) > 1e-3 and float(ref_features.std()) > 0.1
        torch.testing.assert_close(enc.features, ref_features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.tokens, ref_tokens, atol=1e-5, rtol=0)
        recon = model.decode(ref_tokens)
        ref_recon = _ref_decode(sd, model.config, ref_tokens)
        assert float(ref_recon.std()) > 1e-2
        torch.testing.assert_close(recon, ref_recon, atol=1e-5, rtol=1e-5)


def test_whole_model_sdpa_vs_explicit(images64: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = create_model("softvq-tiny-64").eval()
    _randomize(model, seed=3)
    with torch.no_grad():
        a = model(images64).reconstruction
        set_fused_attention(model, False)
        b = model(images64).reconstruction
    assert float((a - b).abs().max()) < 1e-5


def test_pre_quant_features_are_quant_conv_of_encoder(tiny_softvq: SoftVQModel, images64: torch.Tensor) -> None:
    with torch.no_grad():
        enc = tiny_softvq.encode_full(images64)
        feats = F.linear(tiny_softvq.encoder(images64), tiny_softvq.quant_conv.weight, tiny_softvq.quant_conv.bias)
    torch.testing.assert_close(enc.features, feats)


@pytest.mark.parametrize("overrides,extra_keys", [
    ({"quantizer": "gmm"}, {"quantize.tau_head.weight", "quantize.log_prior"}),
    ({"quantizer": "product", "num_groups": 2}, {"quantize.quantizers.1.embedding"}),
    ({"quantizer": "residual", "num_levels": 2}, {"quantize.quantizers.1.embedding", "quantize.level_scale"}),
])
def test_quantizer_variants_train_and_roundtrip(tmp_path, overrides: dict, extra_keys: set, images64) -> None:
    from models.hub import load_pretrained, save_pretrained

    torch.manual_seed(0)
    model = create_model("softvq-tiny-64", **overrides)
    assert extra_keys <= set(model.state_dict())
    out = model(images64)
    assert out.reconstruction.shape == images64.shape and out.tokens.shape == (2, 64, 32)
    (F.mse_loss(out.reconstruction, images64) + out.quantizer.loss).backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("encoder.") and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    save_pretrained(model, tmp_path / "tok")
    loaded = load_pretrained(tmp_path / "tok")
    assert loaded.config.quantizer == overrides["quantizer"]
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode(images64), model.encode(images64))
