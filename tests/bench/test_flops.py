"""The analytical FLOP counter against torch's FlopCounterMode, and against issue 10's published figures."""

from __future__ import annotations

import pytest
import torch

import models
from bench.flops import (
    count_with_torch,
    generation_flops,
    generator_forward_flops,
    softvq_decode_flops,
    softvq_encode_flops,
)
from models.runtime import set_fused_attention


def _within(ours: int, theirs: int, rel: float = 0.02) -> None:
    assert theirs > 0 and abs(ours - theirs) <= rel * theirs, (ours, theirs)


@pytest.mark.parametrize(("name", "overrides"), [
    ("sit-tiny-64x32", {}),
    ("sit-tiny-32x64", {"depth": 3, "mlp_ratio": 2.0}),
    ("dit-tiny-64x32", {}),  # learned sigma: 2C outputs
])
def test_generator_forward_matches_flop_counter(name: str, overrides: dict) -> None:
    torch.manual_seed(0)
    m = models.create_model(name, **overrides).eval()
    set_fused_attention(m, False)  # FlopCounterMode has no CPU SDPA formula; the explicit path is matmuls
    cfg = m.config
    b = 3
    x = torch.randn(b, cfg.num_tokens, cfg.token_dim)
    counted = count_with_torch(lambda: m(x, torch.rand(b), torch.tensor([0, 5, cfg.num_classes])))
    _within(b * generator_forward_flops(cfg), counted)


@pytest.mark.parametrize("overrides", [{}, {"num_tokens": 32, "token_dim": 64, "enc_depth": 1, "dec_width": 96,
                                            "dec_heads": 3, "codebook_size": 128}])
def test_tokenizer_matches_flop_counter(overrides: dict) -> None:
    torch.manual_seed(0)
    tok = models.create_model("softvq-tiny-64", **overrides).eval()
    set_fused_attention(tok, False)
    cfg = tok.config
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    _within(2 * softvq_encode_flops(cfg), count_with_torch(lambda: tok.encode(images)))
    tokens = torch.randn(2, cfg.num_tokens, cfg.token_dim)
    _within(2 * softvq_decode_flops(cfg), count_with_torch(lambda: tok.decode(tokens)))


def test_published_figures_of_issue_10() -> None:
    """GFLOP per image quoted in issue 10 (from the official code's own accounting)."""
    g = models.get_config
    assert softvq_encode_flops(g("softvq-l-64")) / 1e9 == pytest.approx(204.5, abs=0.05)
    assert softvq_decode_flops(g("softvq-l-64")) / 1e9 == pytest.approx(204.4, abs=0.05)
    assert softvq_encode_flops(g("softvq-bl-64")) / 1e9 == pytest.approx(58.7, abs=0.05)
    assert generator_forward_flops(g("sit-xl-64x32")) / 1e9 == pytest.approx(58.07, abs=0.005)
    gen = generation_flops(g("sit-xl_softvq-l-64"), g("softvq-l-64"), "sde", 250, 1.75, 0.0, 0.7)
    assert gen.total / 1e12 == pytest.approx(24.7, abs=0.05)
    assert gen.rows == 422
