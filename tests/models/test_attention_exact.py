"""``TOKSERVE_ATTENTION=exact``: published-layout SoftVQ and SiT (small width) are bit-identical on the CPU in
fp32 to the official code's formula, written out here with the official modules' own ops (timm ``Block`` /
``Attention`` with ``fused_attn = False``: ``q = q * scale; softmax(q @ k^T) @ v``; DiT/SiT adaLN blocks),
independently of tokserve's model classes. With the default ``sdpa`` they agree only to reordering noise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import create_model
from models.layers.attention import attend, attention_mode, get_attention_mode, set_attention_mode


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


def _official_attention(x: torch.Tensor, sd: dict, p: str, heads: int) -> torch.Tensor:
    """timm / SiT ``Attention.forward`` with the fused path off, as the official fp32 code runs it."""
    B, N, C = x.shape
    hd = C // heads
    qkv = F.linear(x, sd[p + "qkv.weight"], sd[p + "qkv.bias"]).reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = q * hd**-0.5
    attn = q @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    x = attn @ v
    return F.linear(x.transpose(1, 2).reshape(B, N, C), sd[p + "proj.weight"], sd[p + "proj.bias"])


def _official_vit_trunk(x: torch.Tensor, sd: dict, pre: str, heads: int) -> torch.Tensor:
    """timm ``Block`` (LayerScale ``x * gamma``, exact GELU, LayerNorm eps 1e-6) x depth, then ``norm``."""
    depth = len({k[len(pre):].split(".")[1] for k in sd if k.startswith(pre + "blocks.")})
    for i in range(depth):
        p = f"{pre}blocks.{i}."
        d = x.shape[-1]
        h = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        x = x + _official_attention(h, sd, p + "attn.", heads) * sd[p + "ls1.gamma"]
        h = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + h * sd[p + "ls2.gamma"]
    return F.layer_norm(x, (x.shape[-1],), sd[pre + "norm.weight"], sd[pre + "norm.bias"], 1e-6)


def _official_sit(sd: dict, depth: int, heads: int, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SiT ``forward`` (vae_1d: no unpatchify): x_embedder + pos_embed, c = t_emb + y_emb, adaLN blocks."""
    def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    h = F.linear(x, sd["x_embedder.weight"], sd["x_embedder.bias"]) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    tf = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = F.linear(F.silu(F.linear(tf, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + F.embedding(y, sd["y_embedder.embedding_table.weight"])
    D = h.shape[-1]
    for i in range(depth):
        p = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        a = modulate(F.layer_norm(h, (D,), eps=1e-6), sh1, sc1)
        h = h + g1.unsqueeze(1) * _official_attention(a, sd, p + "attn.", heads)
        m = modulate(F.layer_norm(h, (D,), eps=1e-6), sh2, sc2)
        m = F.linear(F.gelu(F.linear(m, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate="tanh"),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        h = h + g2.unsqueeze(1) * m
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    h = modulate(F.layer_norm(h, (D,), eps=1e-6), shift, scale)
    return F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])


@pytest.fixture(autouse=True)
def _restore_mode():
    yield
    set_attention_mode("sdpa")


def test_mode_switch_and_validation() -> None:
    assert get_attention_mode() == "sdpa"
    with attention_mode("exact"):
        assert get_attention_mode() == "exact"
    assert get_attention_mode() == "sdpa"
    with pytest.raises(ValueError):
        set_attention_mode("flash")  # type: ignore[arg-type]


def test_attend_exact_is_the_explicit_formula_and_masks() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    with attention_mode("exact"):
        out = attend(q, k, v)
        keep = torch.tril(torch.ones(5, 5, dtype=torch.bool))
        masked = attend(q, k, v, mask=keep)
        bias = attend(q, k, v, mask=torch.zeros(5, 5).masked_fill(~keep, float("-inf")))
    assert torch.equal(out, torch.softmax((q * 8**-0.5) @ k.transpose(-2, -1), -1) @ v)
    assert torch.equal(masked, bias)
    torch.testing.assert_close(masked, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["sit-tiny-64x32", "dit-tiny-32x64"])
def test_sit_exact_is_bit_identical_to_official(name: str) -> None:
    model = _randomize(create_model(name), seed=1)
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, cfg.num_tokens, cfg.token_dim, generator=g)
    t = torch.tensor([0.05, 0.3, 0.9]) if "sit" in name else torch.tensor([3.0, 500.0, 999.0])
    y = torch.tensor([0, 207, cfg.null_class])
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = _official_sit(sd, cfg.depth, cfg.num_heads, x, t, y)
        with attention_mode("exact"):
            exact = model(x, t, y)
        sdpa = model(x, t, y)
    assert float(ref.abs().max()) > 0.1
    assert torch.equal(exact, ref)
    # SDPA: the same function up to reordering noise; documented, not asserted to be zero.
    torch.testing.assert_close(sdpa, ref, atol=2e-5, rtol=1e-5)


def test_softvq_exact_is_bit_identical_to_official(images64: torch.Tensor) -> None:
    model = _randomize(create_model("softvq-tiny-64", tau=0.5), seed=3)
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    enc, dec = model.encoder.model, model.decoder.model
    with torch.no_grad():
        x_enc = torch.cat([enc.add_cls_and_pos(enc.patchify(images64)),
                           (sd["encoder.latent_tokens"] + sd["encoder.latent_pos_embed"]).expand(2, -1, -1)], 1)
        x_dec = torch.randn(2, 1 + dec.num_patches + cfg.num_tokens, dec.embed_dim,
                            generator=torch.Generator().manual_seed(4))
        ref_enc = _official_vit_trunk(x_enc, sd, "encoder.model.", cfg.enc_heads)
        ref_dec = _official_vit_trunk(x_dec, sd, "decoder.model.", cfg.dec_heads)
        with attention_mode("exact"):
            exact_enc, exact_dec = enc.run(x_enc), dec.run(x_dec)
            tokens_exact = model.encode(images64)
            recon_exact = model.decode(tokens_exact)
        sdpa_enc = enc.run(x_enc)
        tokens_sdpa = model.encode(images64)
    assert float(ref_enc.std()) > 0.1 and float(ref_dec.std()) > 0.1
    assert torch.equal(exact_enc, ref_enc) and torch.equal(exact_dec, ref_dec)
    # The whole model in exact mode is deterministic and differs from SDPA only by reordering noise.
    with torch.no_grad(), attention_mode("exact"):
        assert torch.equal(model.encode(images64), tokens_exact)
        assert torch.equal(model.decode(tokens_exact), recon_exact)
    torch.testing.assert_close(sdpa_enc, ref_enc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens_sdpa, tokens_exact, atol=1e-5, rtol=0)
