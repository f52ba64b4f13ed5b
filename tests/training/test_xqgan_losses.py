"""XQ-GAN losses: each one's defining property (hinge margin, non-saturating gradients, adaptive weight as a
gradient-norm ratio with a start step, LeCAM, contrastive loss minimal for aligned pairs)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from training.xqgan.losses import (
    ContrastiveAlignment,
    LeCAM,
    adversarial_weight,
    clip_loss,
    d_loss,
    g_loss,
    pooled_group,
)


def test_hinge_zero_beyond_margin() -> None:
    real = torch.tensor([1.0, 1.5, 7.0]).view(3, 1)
    fake = torch.tensor([-1.0, -2.0, -9.0]).view(3, 1)
    assert float(d_loss("hinge", real, fake)) == 0.0
    real.requires_grad_(True)
    fake.requires_grad_(True)
    d_loss("hinge", real, fake).backward()
    assert (
        float(real.grad.abs().sum()) == 0.0 and float(fake.grad.abs().sum()) == 0.0
    )  # no push past the margin
    # inside the margin: 0.5 * (mean relu(1 - r) + mean relu(1 + f))
    r, f = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 2.0])
    assert float(d_loss("hinge", r, f)) == pytest.approx(0.5 * ((0.5 + 2.0) / 2 + (1.0 + 3.0) / 2))
    assert float(g_loss("hinge", f)) == pytest.approx(-1.0)


def test_non_saturating_and_vanilla() -> None:
    fake = torch.tensor([-8.0, 0.0, 3.0], requires_grad=True)
    # D is sure the fakes are fake (logit -8): non-saturating still gives the generator a gradient,
    # the minimax (vanilla) loss hardly any.
    g_ns = torch.autograd.grad(g_loss("non-saturating", fake[:1]), fake)[0][0]
    g_v = torch.autograd.grad(g_loss("vanilla", fake[:1]), fake)[0][0]
    assert float(g_ns) == pytest.approx(-torch.sigmoid(torch.tensor(8.0)).item(), rel=1e-5)
    assert abs(float(g_v)) < 1e-3 < abs(float(g_ns))
    real = torch.tensor([2.0, -1.0])
    want = 0.5 * (F.softplus(-real).mean() + F.softplus(fake.detach()).mean())
    assert float(d_loss("non-saturating", real, fake.detach())) == pytest.approx(float(want))
    # it is binary cross-entropy with the right targets (real -> 1, fake -> 0)
    bce = 0.5 * (
        F.binary_cross_entropy_with_logits(real, torch.ones(2))
        + F.binary_cross_entropy_with_logits(fake.detach(), torch.zeros(3))
    )
    assert float(d_loss("non-saturating", real, fake.detach())) == pytest.approx(float(bce))
    with pytest.raises(ValueError, match="unknown GAN loss"):
        d_loss("wasserstein", real, real)


def test_adaptive_weight_is_gradient_norm_ratio() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 3)
    out = x @ w.t()
    nll = out.pow(2).mean()
    g = -(out * torch.randn(5, 4)).mean()
    gn = torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    lam = adversarial_weight(nll, g, w, step=10, start=10, disc_weight=0.5)
    assert float(lam) == pytest.approx(0.5 * float(gn / (gg + 1e-4)), rel=1e-5)
    assert not lam.requires_grad
    # before the start step the adversarial term is off
    assert float(adversarial_weight(nll, g, w, step=9, start=10, disc_weight=0.5)) == 0.0
    # without the adaptive ratio: the fixed weight
    assert float(adversarial_weight(nll, g, w, step=10, start=0, disc_weight=0.5, adaptive=False)) == 0.5
    # scaling the generator loss by k scales the ratio by 1 / k
    lam3 = adversarial_weight(nll, 3 * g, w, step=10, start=0, disc_weight=1.0)
    assert float(lam3) == pytest.approx(float(gn / (3 * gg + 1e-4)), rel=1e-5)


def test_lecam_pulls_logits_towards_the_other_sides_ema() -> None:
    # reg = mean relu(D(x) - ema_fake)^2 + mean relu(ema_real - D(G(z)))^2: a quadratic cost on real logits
    # above the fake EMA and fake logits below the real EMA, which bounds the discriminator's confidence.
    reg = LeCAM(decay=0.0).train()
    first = reg(torch.tensor([2.0, 2.0]), torch.tensor([-2.0, -2.0]))  # EMAs start at these means
    assert float(first) == pytest.approx(4.0**2 + 4.0**2)
    reg.eval()  # EMAs frozen at real 2, fake -2
    assert float(reg(torch.tensor([-3.0]), torch.tensor([3.0]))) == 0.0
    assert float(reg(torch.tensor([2.5, -5.0]), torch.tensor([1.0]))) == pytest.approx(4.5**2 / 2 + 1.0**2)
    reg.train()
    reg.decay = 0.5
    reg(torch.tensor([0.0]), torch.tensor([0.0]))
    assert float(reg.ema_real) == pytest.approx(1.0) and float(reg.ema_fake) == pytest.approx(-1.0)


def test_clip_loss_minimal_for_aligned_pairs() -> None:
    torch.manual_seed(0)
    f = F.normalize(torch.randn(4, 8), dim=-1)
    aligned = float(clip_loss(f, f, 10.0))
    for perm in itertools.permutations(range(4)):
        if list(perm) != [0, 1, 2, 3]:
            assert float(clip_loss(f, f[list(perm)], 10.0)) > aligned
    # orthonormal aligned pairs: the loss falls to 0 as the temperature falls, log(B) at scale 0
    e = torch.eye(4)
    assert float(clip_loss(e, e, 100.0)) < 1e-6
    assert float(clip_loss(e, e, 0.0)) == pytest.approx(math.log(4))
    with pytest.raises(ValueError, match="at least 2"):
        clip_loss(f[:1], f[:1])


def test_pooled_group_picks_channels() -> None:
    tokens = torch.arange(2 * 6 * 2 * 2, dtype=torch.float32).view(2, 6, 2, 2)
    last = pooled_group(tokens, 3, -1)
    assert last.shape == (2, 2)
    torch.testing.assert_close(last, tokens[:, 4:].mean(dim=(2, 3)))
    torch.testing.assert_close(
        pooled_group(tokens.flatten(2).transpose(1, 2), 3, 0), tokens[:, :2].mean(dim=(2, 3))
    )


def test_contrastive_alignment_learns_to_align() -> None:
    torch.manual_seed(0)
    feats = torch.randn(8, 16)
    tokens = torch.randn(8, 6, 2, 2, requires_grad=True)
    align = ContrastiveAlignment(6, 16, num_groups=3, group=-1, temperature=0.1)
    opt = torch.optim.Adam([tokens, *align.parameters()], lr=0.05)
    first = float(align(tokens, feats).detach())
    for _ in range(60):
        loss = align(tokens, feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(align(tokens, feats).detach()) < 0.2 * first
    assert tokens.grad[:, :4].abs().sum() == 0  # only the chosen group is aligned
    # the frozen features get no gradient through the loss
    f = feats.clone().requires_grad_(True)
    align(tokens, f).backward()
    assert f.grad is None or float(f.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="out of range"):
        ContrastiveAlignment(6, 16, num_groups=3, group=3)
