"""Discrete quantizers (issue 7): each one's defining property, the indices -> codes round trip, gradient flow,
usage tracking, and the published key layouts (FORMATS.md 2.3 and 3.3). CPU, tiny sizes."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from models.quantizers.base import Quantizer, QuantizerOutput, codebook_utilization, perplexity
from models.quantizers.bsq import BinarySphericalQuantizer
from models.quantizers.coda import MAR_SCALES, CODAQuantizer
from models.quantizers.lfq import LookupFreeQuantizer
from models.quantizers.msrq import IMAGEFOLDER_SCALES, MultiScaleResidualQuantizer
from models.quantizers.product import ProductQuantizer
from models.quantizers.residual import ResidualQuantizer
from models.quantizers.vq import VectorQuantizer

SMALL_SCALES = (1, 2, 3, 3, 5)  # a repeated scale, like ImageFolder's (1, 1, ..., 3, 3, ...)


def _vq(**kw) -> VectorQuantizer:
    q = VectorQuantizer(32, 8, **kw)
    with torch.no_grad():  # a spread-out codebook so that many codes are used
        q.embedding.weight.copy_(torch.randn(32, 8))
    return q


def _msrq(**kw) -> MultiScaleResidualQuantizer:
    return MultiScaleResidualQuantizer(64, 8, SMALL_SCALES, **kw)


def _coda(**kw) -> CODAQuantizer:
    return CODAQuantizer(64, 8, SMALL_SCALES, attn_dim=12, **kw)


# name -> (builder, input shape)
BUILDERS: dict[str, tuple[Callable[[], Quantizer], tuple[int, ...]]] = {
    "vq": (lambda: _vq(), (3, 10, 8)),
    "vq_cosine": (lambda: _vq(cosine=True), (3, 10, 8)),
    "vq_ema": (lambda: _vq(ema=True), (3, 10, 8)),
    "residual_vq": (lambda: ResidualQuantizer.build(3, lambda i: _vq()), (3, 10, 8)),
    "product_vq": (lambda: ProductQuantizer([_vq(), _vq()]), (3, 10, 16)),
    "product_of_residual_vq": (
        lambda: ProductQuantizer([ResidualQuantizer.build(2, lambda i: _vq()) for _ in range(3)]),
        (3, 10, 24),
    ),
    "lfq": (lambda: LookupFreeQuantizer(6), (3, 10, 6)),
    "bsq": (lambda: BinarySphericalQuantizer(6), (3, 10, 6)),
    "residual_lfq": (
        lambda: ResidualQuantizer.build(3, lambda i: LookupFreeQuantizer(5, code_scale=0.5**i)),
        (3, 10, 5),
    ),
    "msrq": (lambda: _msrq(), (2, 8, 5, 5)),
    "msrq_euclidean": (lambda: _msrq(cosine=False), (2, 8, 5, 5)),
    "product_msrq": (lambda: ProductQuantizer([_msrq(), _msrq()], channel_dim=1), (2, 16, 5, 5)),
    "coda": (lambda: _coda(), (2, 8, 5, 5)),
}


def _build(name: str, seed: int = 0) -> tuple[Quantizer, torch.Tensor]:
    builder, shape = BUILDERS[name]
    torch.manual_seed(seed)
    return builder(), torch.randn(shape)


# ---------------------------------------------------------------- the contract, for every quantizer


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("training", [False, True])
def test_indices_to_codes_round_trip(name: str, training: bool) -> None:
    q, z = _build(name)
    q.train(training)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape
    assert out.indices.dtype == torch.int64
    assert all(v.dim() == 0 for v in out.losses.values())
    if training and name == "vq_ema":
        return  # the EMA update moves the codebook after the assignment; checked in eval mode
    decoded = q.indices_to_codes(out.indices)
    torch.testing.assert_close(decoded, out.quantized.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["vq", "vq_cosine", "vq_ema", "product_vq", "lfq", "bsq"])
def test_quantization_is_a_projection(name: str) -> None:
    """Re-quantizing the codes of a single-level quantizer gives the same indices (codes are fixed points)."""
    q, z = _build(name)
    q.eval()
    out = q(z)
    again = q(out.quantized.detach())
    assert torch.equal(again.indices, out.indices)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_gradient_reaches_the_input(name: str) -> None:
    q, z = _build(name)
    q.train()
    z.requires_grad_(True)
    out = q(z)
    upstream = torch.randn_like(out.quantized)
    (out.quantized * upstream).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0
    normalised = name in {"vq_cosine", "bsq"}
    if not isinstance(q, CODAQuantizer) and not normalised:
        # straight-through: the quantizer is the identity for the backward pass
        torch.testing.assert_close(z.grad, upstream)


# ---------------------------------------------------------------- VQ


def test_vq_picks_the_nearest_code() -> None:
    q, z = _build("vq")
    out = q.eval()(z)
    dist = torch.cdist(z.reshape(-1, 8), q.embedding.weight)
    assert torch.equal(out.indices.reshape(-1), dist.argmin(-1))


def test_vq_cosine_picks_the_most_similar_code_and_emits_unit_vectors() -> None:
    q, z = _build("vq_cosine")
    out = q.eval()(z * 7.0)  # the scale of z does not matter
    sim = F.normalize(z.reshape(-1, 8), dim=-1) @ F.normalize(q.embedding.weight, dim=-1).t()
    assert torch.equal(out.indices.reshape(-1), sim.argmax(-1))
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(3, 10))


def test_vq_losses_train_codebook_and_encoder_separately() -> None:
    q, z = _build("vq")
    z.requires_grad_(True)
    out = q.train()(z)
    out.losses["codebook"].backward(retain_graph=True)
    assert z.grad is None or z.grad.abs().sum() == 0
    assert q.embedding.weight.grad.abs().sum() > 0
    q.embedding.weight.grad = None
    out.losses["commitment"].backward()
    assert q.embedding.weight.grad is None or q.embedding.weight.grad.abs().sum() == 0
    assert z.grad.abs().sum() > 0
    expected = 0.25 * F.mse_loss(z.detach(), q.indices_to_codes(out.indices))
    torch.testing.assert_close(out.losses["commitment"].detach(), expected)


def test_vq_ema_moves_used_codes_towards_their_vectors() -> None:
    q, z = _build("vq_ema")
    assert not q.embedding.weight.requires_grad
    before = q.embedding.weight.detach().clone()
    out = q.train()(z)
    assert float(out.losses["codebook"]) == 0.0
    used = out.indices.unique()
    code = int(used[0])
    mean_assigned = z.reshape(-1, 8)[out.indices.reshape(-1) == code].mean(0)
    new = q.embedding.weight[code]
    assert (new - mean_assigned).norm() < (before[code] - mean_assigned).norm()
    unused = torch.ones(32, dtype=torch.bool)
    unused[used] = False
    # unused codes keep their value, up to the Laplace smoothing of the cluster sizes
    torch.testing.assert_close(q.embedding.weight[unused], before[unused], rtol=1e-3, atol=1e-6)


def test_vq_usage_is_tracked() -> None:
    q, z = _build("vq")
    out = q.eval()(z)
    counts = out.usage["codebook"]
    assert counts.shape == (32,) and float(counts.sum()) == z.numel() / 8
    assert torch.equal(counts, torch.bincount(out.indices.reshape(-1), minlength=32).float())
    assert float(q.usage_ema.sum()) == 0.0  # eval mode does not update the running counts
    q.train()(z)
    assert torch.allclose(q.usage_ema, 0.01 * counts)
    assert codebook_utilization(counts) == pytest.approx(float((counts > 0).float().mean()))
    assert 1.0 <= perplexity(counts) <= 32.0


# ---------------------------------------------------------------- residual


def test_residual_error_is_non_increasing_over_levels() -> None:
    torch.manual_seed(0)
    levels = []
    for i in range(5):
        vq = VectorQuantizer(64, 4)
        with torch.no_grad():
            vq.embedding.weight.copy_(torch.randn(64, 4) * 0.5**i)
            vq.embedding.weight[0].zero_()  # the zero code: a level can always leave the residual unchanged
        levels.append(vq)
    rq = ResidualQuantizer(levels).eval()
    z = torch.randn(200, 4)
    out = rq(z)
    assert out.indices.shape == (200, 5)
    errors = []
    for n in range(1, 6):
        prefix = out.indices.clone()
        prefix[:, n:] = -1
        errors.append((z - rq.indices_to_codes(prefix)).norm(dim=-1))
    errors = torch.stack(errors)  # (levels, N)
    assert (errors[1:] <= errors[:-1] + 1e-5).all()
    assert errors[-1].mean() < 0.5 * errors[0].mean()


def test_residual_levels_quantize_the_remaining_residual() -> None:
    rq, z = _build("residual_vq")
    out = rq.eval()(z)
    residual = z
    for level, vq in enumerate(rq.levels):
        assert torch.equal(out.indices[..., level], vq(residual).indices)
        residual = residual - vq.indices_to_codes(out.indices[..., level])
    assert set(out.usage) == {"level0/codebook", "level1/codebook", "level2/codebook"}


def test_residual_quantizer_dropout_drops_trailing_levels() -> None:
    torch.manual_seed(3)
    rq = ResidualQuantizer.build(4, lambda i: _vq(), dropout_prob=1.0, dropout_min_levels=1).train()
    z = torch.randn(2, 5, 8)
    seen = set()
    for _ in range(20):
        out = rq(z)
        active = (out.indices[0, 0] >= 0).sum().item()
        seen.add(active)
        assert (out.indices[..., :active] >= 0).all() and (out.indices[..., active:] == -1).all()
        torch.testing.assert_close(
            rq.indices_to_codes(out.indices), out.quantized.detach(), atol=1e-5, rtol=0
        )
        assert all(int(k[5]) < active for k in out.usage)  # "level{l}/codebook" only for levels that ran
    assert len(seen) > 1 and seen <= {1, 2, 3, 4}
    assert len({(rq.eval()(z).indices >= 0).all().item()}) == 1  # no dropout in eval


# ---------------------------------------------------------------- product


def test_product_is_the_exact_concatenation_of_its_groups() -> None:
    pq, z = _build("product_vq")
    out = pq.eval()(z)
    parts = [g(chunk) for g, chunk in zip(pq.groups, z.split(8, dim=-1), strict=True)]
    assert torch.equal(out.quantized, torch.cat([p.quantized for p in parts], dim=-1))
    assert torch.equal(out.indices, torch.stack([p.indices for p in parts], dim=-1))
    assert set(out.usage) == {"group0/codebook", "group1/codebook"}


def test_product_of_residuals_index_layout() -> None:
    pq, z = _build("product_of_residual_vq")
    out = pq.eval()(z)
    assert out.indices.shape == (3, 10, 2, 3)  # (..., Q levels, G groups)
    for g, rq in enumerate(pq.groups):
        torch.testing.assert_close(
            rq.indices_to_codes(out.indices[..., g]), out.quantized[..., 8 * g : 8 * g + 8]
        )


def test_product_of_multiscale_quantizers_on_channels() -> None:
    pq, z = _build("product_msrq")
    out = pq.eval()(z)
    assert out.indices.shape == (2, sum(p * p for p in SMALL_SCALES), 2)
    assert torch.equal(out.quantized[:, 8:], pq.groups[1](z[:, 8:]).quantized)


# ---------------------------------------------------------------- LFQ / BSQ


def test_lfq_codes_are_signs_and_indices_are_little_endian_bits() -> None:
    q = LookupFreeQuantizer(3, code_scale=0.5).eval()
    z = torch.tensor([[0.3, -2.0, 1.0], [-0.1, 0.2, -0.3]])
    out = q(z)
    torch.testing.assert_close(out.quantized, torch.tensor([[0.5, -0.5, 0.5], [-0.5, 0.5, -0.5]]))
    assert out.indices.tolist() == [1 + 4, 2]
    all_codes = q.indices_to_codes(torch.arange(8))
    assert len({tuple(c.tolist()) for c in all_codes}) == 8


def test_lfq_and_bsq_codes_are_binary() -> None:
    lfq, z = _build("lfq")
    codes = lfq.eval()(z).quantized
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    bsq, z = _build("bsq")
    codes = bsq.eval()(z * 5.0).quantized
    level = 1 / math.sqrt(6)
    torch.testing.assert_close(codes.abs(), torch.full_like(codes, level))
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(codes.shape[:-1]))
    assert torch.equal(codes > 0, z > 0)


def test_lfq_entropy_factorized_matches_exact_per_sample_and_bounds_batch() -> None:
    torch.manual_seed(0)
    z = torch.randn(64, 5) * 0.05
    exact = LookupFreeQuantizer(5, entropy_mode="exact")
    factorized = LookupFreeQuantizer(5, entropy_mode="factorized")
    s_exact, b_exact = exact.entropy_terms(z)
    s_fact, b_fact = factorized.entropy_terms(z)
    torch.testing.assert_close(s_fact, s_exact, atol=1e-4, rtol=1e-4)
    assert b_fact >= b_exact - 1e-5  # the sum of per-bit entropies bounds the joint entropy
    assert 0 <= b_exact <= 5 * math.log(2) + 1e-5


def test_lfq_entropy_loss_rewards_confident_and_diverse_codes() -> None:
    q = LookupFreeQuantizer(4)
    confident_diverse = q.indices_to_codes(torch.arange(16)) * 3.0
    collapsed = torch.full((16, 4), 3.0)
    uncertain = torch.zeros(16, 4) + 1e-4
    assert q.entropy_loss(confident_diverse) < q.entropy_loss(collapsed)
    assert q.entropy_loss(confident_diverse) < q.entropy_loss(uncertain)
    z = torch.randn(8, 4, requires_grad=True)
    q.train()(z).losses["entropy"].backward()
    assert z.grad.abs().sum() > 0


def test_lfq_usage_counts() -> None:
    q, z = _build("lfq")
    out = q.train()(z)
    assert out.usage["codebook"].shape == (64,)
    assert float(out.usage["codebook"].sum()) == 30
    assert float(q.usage_ema.sum()) == pytest.approx(0.3)


# ---------------------------------------------------------------- multi-scale residual (VAR / ImageFolder)


def _reference_msrq_indices(q: MultiScaleResidualQuantizer, f: torch.Tensor) -> torch.Tensor:
    """The algorithm of FORMATS.md 2.4, written out step by step."""
    rest, side, out = f.clone(), f.shape[-1], []
    emb = q.embedding.weight.detach()
    for si, p in enumerate(q.scales):
        small = F.adaptive_avg_pool2d(rest, p)
        vec = small.permute(0, 2, 3, 1).reshape(-1, q.dim)
        idx = (F.normalize(vec, dim=-1) @ F.normalize(emb, dim=-1).t()).argmax(-1)
        h = emb[idx].view(f.shape[0], p, p, q.dim).permute(0, 3, 1, 2)
        if si < len(q.scales) - 1:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        conv = q.quant_resi.qresi_ls[q.quant_resi.index_for(si, len(q.scales))]
        h = 0.5 * h + 0.5 * F.conv2d(h, conv.weight, conv.bias, padding=1)
        rest = rest - h
        out.append(idx.view(f.shape[0], -1))
    return torch.cat(out, dim=1)


def test_msrq_follows_the_published_algorithm() -> None:
    q, z = _build("msrq")
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(64, 8))
        out = q.eval()(z)
        assert torch.equal(out.indices, _reference_msrq_indices(q, z))


def test_msrq_phi_picked_by_tick_position() -> None:
    phi = MultiScaleResidualQuantizer(16, 4, IMAGEFOLDER_SCALES).quant_resi
    # Published: ticks = linspace(1/3/4, 1-1/3/4, 4), conv = argmin |ticks - si/9|. Scales 2 and 7 sit
    # exactly between two ticks and round-off picks the later tick (the published mapping).
    assert [phi.index_for(si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi.index_for(si, 4) for si in range(4)] == [0, 1, 2, 3]
    assert phi.index_for(0, 1) == 0


def test_msrq_gradients_codebook_and_phi() -> None:
    q, z = _build("msrq")
    out = q.train()(z)
    out.losses["codebook"].backward()
    assert q.embedding.weight.grad.abs().sum() > 0
    used = {q.quant_resi.index_for(si, q.num_scales) for si in range(q.num_scales)}
    for k in used:
        assert q.quant_resi.qresi_ls[k].weight.grad.abs().sum() > 0


def test_msrq_usage_buffer_per_scale() -> None:
    q, z = _build("msrq")
    out = q.train()(z)
    assert set(out.usage) == {f"scale{si}" for si in range(len(SMALL_SCALES))}
    for si, p in enumerate(SMALL_SCALES):
        assert float(out.usage[f"scale{si}"].sum()) == 2 * p * p
        assert torch.equal(q.ema_vocab_hit_SV[si], out.usage[f"scale{si}"])  # the first call copies
    first = q.ema_vocab_hit_SV.clone()
    out2 = q(z)
    torch.testing.assert_close(q.ema_vocab_hit_SV[0], 0.9 * first[0] + 0.1 * out2.usage["scale0"])


def test_msrq_dropout_keeps_a_prefix_of_scales_per_sample() -> None:
    torch.manual_seed(1)
    q = _msrq(dropout_prob=1.0, dropout_start=2).train()
    z = torch.randn(6, 8, 5, 5)
    out = q(z)
    per_scale = q.split_indices(out.indices)
    kept = torch.stack([(idx >= 0).all(1) for idx in per_scale], dim=1)  # (B, S)
    assert kept[:, :2].all()
    assert (kept.int().diff(dim=1) <= 0).all()  # once dropped, dropped for the finer scales
    assert not kept.all()
    torch.testing.assert_close(q.indices_to_codes(out.indices), out.quantized.detach(), atol=1e-5, rtol=1e-5)


def test_msrq_var_helpers_agree_with_decoding() -> None:
    q, z = _build("msrq")
    with torch.no_grad():
        out = q.eval()(z)
        parts = q.split_indices(out.indices)
        f_hat = torch.zeros_like(z)
        for si in range(q.num_scales):
            f_hat, nxt = q.next_scale_input(si, f_hat, q.embed_scale(si, parts[si]))
        torch.testing.assert_close(f_hat, q.indices_to_codes(out.indices))
        tf = q.teacher_forcing_input(out.indices)
    assert tf.shape == (2, q.num_tokens - 1, 8)


def test_msrq_imagefolder_key_layout() -> None:
    q = MultiScaleResidualQuantizer(4096, 32, IMAGEFOLDER_SCALES)
    shapes = {k: tuple(v.shape) for k, v in q.state_dict().items()}
    expected = {"embedding.weight": (4096, 32), "ema_vocab_hit_SV": (10, 4096)}
    for k in range(4):
        expected[f"quant_resi.qresi_ls.{k}.weight"] = (32, 32, 3, 3)
        expected[f"quant_resi.qresi_ls.{k}.bias"] = (32,)
    assert shapes == expected
    assert q.num_tokens == 286
    # the two ImageFolder branches: quantizes.{0,1}.* map to groups.{0,1}.*
    pq = ProductQuantizer([q, MultiScaleResidualQuantizer(4096, 32, IMAGEFOLDER_SCALES)], channel_dim=1)
    assert {k.split(".", 2)[2] for k in pq.state_dict()} == set(expected)
    q.load_state_dict({k: torch.randn(s) for k, s in expected.items()}, strict=True)


# ---------------------------------------------------------------- CODA


def test_coda_assignment_is_argmax_of_normalised_attention_logits() -> None:
    q = CODAQuantizer(64, 8, scales=(4,), attn_dim=12).eval()
    z = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        x = z.permute(0, 2, 3, 1).reshape(-1, 8)
        qv = q.attn.to_q(x)
        qv = qv * torch.rsqrt(qv.square().mean(-1, keepdim=True) + 1e-5) * q.attn.norm_q.weight
        kv = q.attn.to_k(q.codebooks.weight)
        kv = kv * torch.rsqrt(kv.square().mean(-1, keepdim=True) + 1e-5) * q.attn.norm_k.weight
        idx = (qv @ kv.t() / math.sqrt(12)).argmax(-1)
        out = q(z)
    assert torch.equal(out.indices.reshape(-1), idx)
    value = q.attn.to_v(q.codebooks.weight)[idx]  # the value projection, not the raw codebook row
    torch.testing.assert_close(out.quantized, value.view(2, 4, 4, 8).permute(0, 3, 1, 2))


def test_coda_decode_from_indices_equals_quantized_output() -> None:
    q, z = _build("coda")
    for training in (False, True):
        out = q.train(training)(z)
        torch.testing.assert_close(q.indices_to_codes(out.indices), out.quantized.detach(), atol=0, rtol=0)


def test_coda_residual_levels_use_the_shared_codebook_without_phi() -> None:
    q, z = _build("coda")
    with torch.no_grad():
        out = q.eval()(z)
        rest, expected = z.clone(), []
        for p in SMALL_SCALES:
            small = F.adaptive_avg_pool2d(rest, p)
            sub = CODAQuantizer(64, 8, scales=(p,), attn_dim=12)
            sub.load_state_dict(q.state_dict())
            sub_out = sub.eval()(small)
            expected.append(sub_out.indices)
            up = (
                sub_out.quantized if p == 5 else F.interpolate(sub_out.quantized, size=(5, 5), mode="bicubic")
            )
            rest = rest - up
    assert torch.equal(out.indices, torch.cat(expected, dim=1))


def test_coda_gradients_reach_every_parameter() -> None:
    q, z = _build("coda", seed=1)
    q.entropy_weight = 0.1
    z.requires_grad_(True)
    out = q.train()(z)
    (out.quantized.square().mean() + out.loss).backward()
    assert z.grad.abs().sum() > 0
    for name, p in q.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(out.losses) == {"quant", "entropy"}


def test_coda_mar_key_layout() -> None:
    q = CODAQuantizer(16384, 16, MAR_SCALES, attn_dim=32)
    shapes = {k: tuple(v.shape) for k, v in q.state_dict().items()}
    assert shapes == {
        "codebooks.weight": (16384, 16),
        "attn.to_q.weight": (32, 16),
        "attn.to_q.bias": (32,),
        "attn.to_k.weight": (32, 16),
        "attn.to_k.bias": (32,),
        "attn.to_v.weight": (16, 16),
        "attn.to_v.bias": (16,),
        "attn.norm_q.weight": (32,),
        "attn.norm_k.weight": (32,),
    }
    assert q.attn.norm_q.eps == 1e-5 and q.attn.norm_k.eps == 1e-5
    assert q.num_tokens == 680
    q.load_state_dict({k: torch.randn(s) for k, s in shapes.items()}, strict=True)
    out = q.eval()(torch.randn(1, 16, 16, 16))
    assert out.indices.shape == (1, 680) and int(out.indices.max()) < 16384
