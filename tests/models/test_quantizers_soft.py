"""Soft vector quantizer family: posterior, hard limit, layouts, entropy terms, variants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.quantizers.base import Quantizer, QuantizerOutput
from models.quantizers.soft import (
    USAGE_WINDOW,
    GMMVectorQuantizer,
    ProductSoftQuantizer,
    ResidualSoftQuantizer,
    SoftQuantizerOutput,
    SoftVectorQuantizer,
    build_soft_quantizer,
)

V, D, K, L = 64, 16, 4, 32


def _tokens(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, L, D, generator=torch.Generator().manual_seed(seed)) * 3


def _quantizer(kind: str, tau: float = 0.07, **kw: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_soft_quantizer(kind, codebook_size=V, dim=D, num_codebooks=K, tau=tau, **kw).eval()


VARIANTS = [("soft", {}), ("gmm", {}), ("product", {"num_groups": 2}), ("residual", {"num_levels": 3})]


def _reference_soft(z: torch.Tensor, emb: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The published forward, written from FORMATS.md 1.6: z.view(B, K, L/K, d), normalise, softmax(cos/tau)."""
    b = z.shape[0]
    zs = F.normalize(z.view(b, K, L // K, D), p=2, dim=-1, eps=1e-12)
    e = F.normalize(emb, p=2, dim=-1, eps=1e-12)
    out = torch.empty_like(zs)
    probs = torch.empty(b, K, L // K, V)
    for k in range(K):
        p = torch.softmax(zs[:, k] @ e[k].T / tau, dim=-1)
        probs[:, k] = p
        out[:, k] = p @ e[k]
    return out.reshape(b, L, D), probs.reshape(b, L, V)


def test_matches_reference_forward() -> None:
    q = _quantizer("soft")
    z = _tokens()
    out = q(z)
    ref_q, ref_p = _reference_soft(z, q.embedding.detach(), 0.07)
    assert isinstance(out, QuantizerOutput) and isinstance(out, SoftQuantizerOutput) and isinstance(q, Quantizer)
    assert out.quantized.shape == (3, L, D) and out.indices.shape == (3, K, L // K) and out.probs.shape == (3, L, V)
    torch.testing.assert_close(out.quantized, ref_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.probs, ref_p, atol=1e-6, rtol=0)
    # quantized tokens are convex combinations of unit codewords, and are not re-normalised
    norms = out.quantized.detach().norm(dim=-1)
    assert float(norms.max()) <= 1 + 1e-5 and float(norms.min()) < 0.999


@pytest.mark.parametrize("kind,kw", VARIANTS)
def test_posterior_rows_sum_to_one(kind: str, kw: dict[str, int]) -> None:
    out = _quantizer(kind, **kw)(_tokens())
    assert out.probs is not None and bool((out.probs >= 0).all())
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(out.probs.shape[:-1]), atol=1e-5, rtol=0)


def test_tau_to_zero_is_hard_cosine_vq() -> None:
    q = _quantizer("soft", tau=1e-6)
    z = _tokens()
    out = q(z)
    e = F.normalize(q.embedding.detach(), dim=-1)
    zn = F.normalize(z, dim=-1)
    for b in range(z.shape[0]):
        for t in range(L):
            k = t // (L // K)
            cos = e[k] @ zn[b, t]
            best = int(cos.argmax())
            assert int(out.indices[b, k, t % (L // K)]) == best
            torch.testing.assert_close(out.quantized[b, t], e[k, best], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,kw", VARIANTS)
def test_indices_to_codes_roundtrip_in_hard_limit(kind: str, kw: dict[str, int]) -> None:
    q = _quantizer(kind, tau=1e-6, **kw)
    out = q(_tokens())
    torch.testing.assert_close(q.indices_to_codes(out.indices), out.quantized, atol=1e-5, rtol=0)


def test_codebook_k_serves_contiguous_segment_k() -> None:
    q = _quantizer("soft", tau=1e-6)
    with torch.no_grad():  # codebook k holds only +/- e_k, so a code's sign axis reveals its codebook
        q.embedding.zero_()
        for k in range(K):
            q.embedding[k, :, k] = torch.where(torch.arange(V) % 2 == 0, 1.0, -1.0)
    out = q(_tokens())
    axis = out.quantized.abs().argmax(-1)  # (B, L)
    assert torch.equal(axis, (torch.arange(L) // (L // K)).expand_as(axis))


def test_indices_are_per_sample_in_a_batch() -> None:
    q = _quantizer("soft")
    z = _tokens(b=4)
    batch = q(z).indices
    for b in range(4):
        assert torch.equal(batch[b], q(z[b : b + 1]).indices[0])


def test_entropy_terms() -> None:
    q = _quantizer("soft", tau=1e-3)
    z = _tokens(b=8)
    out = q(z)
    logits = torch.einsum("bksd,kvd->bksv", F.normalize(z.view(8, K, L // K, D), dim=-1), q.codebook().detach()) / 1e-3
    p = torch.softmax(logits, -1)
    sample = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
    avg = p.mean(dim=(0, 2))
    avg_ent = -(avg * torch.log(avg.clamp_min(1e-30))).sum(-1).mean()
    torch.testing.assert_close(out.sample_entropy, sample, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.avg_entropy, avg_ent, atol=1e-4, rtol=1e-4)
    assert set(out.losses) == {"entropy"}  # ready to sum (base contract), weight 1 here
    torch.testing.assert_close(out.loss, sample - avg_ent, atol=1e-4, rtol=1e-4)
    assert float(out.sample_entropy) < 0.5  # nearly one-hot at tau = 1e-3
    # hit counts of the argmax codes, per codebook
    assert sorted(out.usage) == [f"codebook{k}" for k in range(K)]
    assert torch.equal(out.usage["codebook1"], torch.bincount(out.indices[:, 1].flatten(), minlength=V).float())
    # a very soft posterior over identical tokens: H(q) ~ log V and H(E q) ~ log V
    flat = build_soft_quantizer("soft", codebook_size=V, dim=D, num_codebooks=K, tau=1e3, entropy_weight=0.5)
    o = flat(torch.ones(2, L, D))
    assert abs(float(o.sample_entropy) - math.log(V)) < 1e-3
    assert abs(float(o.losses["entropy"])) < 1e-3
    none = q(z, compute_losses=False)
    assert none.losses == {} and none.usage == {} and none.sample_entropy is None
    q2 = build_soft_quantizer("soft", codebook_size=V, dim=D, num_codebooks=K, tau=1e-3, entropy_weight=0.01)
    q2.load_state_dict(q.state_dict())
    torch.testing.assert_close(q2(z).losses["entropy"], 0.01 * (sample - avg_ent), atol=1e-5, rtol=1e-4)


def test_entropy_tau_recomputes_at_another_temperature() -> None:
    torch.manual_seed(0)
    q = SoftVectorQuantizer(V, D, K, tau=0.07, entropy_tau=0.01)
    torch.manual_seed(0)
    ref = SoftVectorQuantizer(V, D, K, tau=0.01)
    z = _tokens()
    torch.testing.assert_close(q(z).losses["entropy"], ref(z).losses["entropy"])
    torch.testing.assert_close(q(z).sample_entropy, ref(z).sample_entropy)
    assert not torch.allclose(q(z).quantized, ref(z).quantized)


def test_losses_have_gradients_into_the_encoder_side() -> None:
    q = _quantizer("soft").train()
    z = _tokens().requires_grad_(True)
    out = q(z)
    (out.losses["entropy"] + out.quantized.square().mean()).backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0
    assert q.embedding.grad is not None and float(q.embedding.grad.abs().sum()) > 0


def test_usage_buffer_only_moves_in_training() -> None:
    q = _quantizer("soft")
    assert q.codebook_used.shape == (K, USAGE_WINDOW)
    before = q.codebook_used.clone()
    q(_tokens())
    assert torch.equal(q.codebook_used, before)
    q.train()
    out = q(_tokens())
    seen = out.indices.transpose(0, 1).reshape(K, -1).float()
    assert torch.equal(q.codebook_used[:, -seen.shape[1]:], seen)
    usage = q.codebook_usage()
    assert usage.shape == (K,) and bool((usage > 0).all()) and bool((usage <= 1).all())


def test_gmm_starts_equal_to_soft_and_learns_temperature() -> None:
    torch.manual_seed(0)
    soft = SoftVectorQuantizer(V, D, K, tau=0.07)
    torch.manual_seed(0)
    gmm = GMMVectorQuantizer(V, D, K, tau=0.07)
    z = _tokens()
    torch.testing.assert_close(gmm(z).quantized, soft(z).quantized, atol=1e-6, rtol=0)
    assert {"tau_head.weight", "tau_head.bias", "log_prior", "embedding"} <= set(gmm.state_dict())
    with torch.no_grad():
        gmm.tau_head.bias.fill_(2.0)  # a larger per-token variance gives a softer posterior
    with torch.no_grad():
        assert float(gmm(z).sample_entropy) > float(soft(z).sample_entropy)
        assert float(gmm.temperatures(gmm.segments(z)).mean()) > 0.07


def test_product_and_residual_reduce_to_soft() -> None:
    z = _tokens()
    torch.manual_seed(0)
    soft = SoftVectorQuantizer(V, D, K, tau=0.07, track_usage=False)
    torch.manual_seed(0)
    prod = ProductSoftQuantizer(1, D, V, num_codebooks=K, tau=0.07)
    torch.manual_seed(0)
    res = ResidualSoftQuantizer(1, D, V, num_codebooks=K, tau=0.07)
    torch.testing.assert_close(prod(z).quantized, soft(z).quantized, atol=1e-6, rtol=0)
    torch.testing.assert_close(res(z).quantized, soft(z).quantized, atol=1e-6, rtol=0)


def test_product_quantizes_channel_groups_independently() -> None:
    q = _quantizer("product", num_groups=2)
    z = _tokens()
    out = q(z)
    assert out.indices.shape == (3, K, L // K, 2) and out.probs.shape == (3, L, 2, V)
    first = q.quantizers[0](z[..., : D // 2])
    torch.testing.assert_close(out.quantized[..., : D // 2], first.quantized)
    assert torch.equal(out.indices[..., 0], first.indices)
    assert sorted(out.usage)[:2] == ["group0/codebook0", "group0/codebook1"]
    second = q.quantizers[1](z[..., D // 2 :])
    torch.testing.assert_close(out.sample_entropy, (first.sample_entropy + second.sample_entropy) / 2)


def test_residual_levels_reduce_the_error() -> None:
    q = _quantizer("residual", tau=0.01, num_levels=3)
    z = F.normalize(_tokens(), dim=-1)
    out = q(z)
    assert out.indices.shape == (3, K, L // K, 3) and out.probs.shape == (3, L, 3, V)
    with torch.no_grad():
        err1 = (z - q.level_scale[0] * q.quantizers[0](z).quantized).norm(dim=-1).mean()
        err3 = (z - out.quantized).norm(dim=-1).mean()
    assert float(err3) < float(err1)


def test_bad_shapes_are_reported() -> None:
    q = _quantizer("soft")
    with pytest.raises(ValueError, match="divisible"):
        q(torch.randn(1, L + 1, D))
    with pytest.raises(ValueError, match="expected tokens"):
        q(torch.randn(1, L, D + 1))
    with pytest.raises(ValueError, match="unknown quantizer"):
        build_soft_quantizer("hard", codebook_size=V, dim=D, num_codebooks=K, tau=0.1)
