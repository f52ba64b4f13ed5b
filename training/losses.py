"""Tokenizer losses: reconstruction, perceptual, adversarial (patch discriminator + hinge), the SoftVQ KL term
and representation alignment of latent tokens to a frozen encoder.

Shapes: images (B, 3, H, W) in [-1, 1]; tokens (B, L, D); encoder features (B, C, h, w).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean L1 (``"l1"``), L2 (``"l2"``) or their sum (``"l1+l2"``) between images."""
    if kind == "l1":
        return (x - x_hat).abs().mean()
    if kind == "l2":
        return (x - x_hat).pow(2).mean()
    if kind == "l1+l2":
        return (x - x_hat).abs().mean() + (x - x_hat).pow(2).mean()
    raise ValueError(f"unknown reconstruction loss {kind!r}")


# ---------------------------------------------------------------------------------------------- adversarial


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017): ``n_layers`` stride-2 4x4 convs (channels ``ndf * 2^i``,
    capped at 8 ndf), a stride-1 conv and a 1-channel head. ``forward(images (B, 3, H, W)) -> logits
    (B, 1, h, w)``, one per overlapping patch. GroupNorm instead of BatchNorm keeps it batch-size free."""

    def __init__(self, ndf: int = 64, n_layers: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                       nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))], halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance: ||d nll / d w|| / (||d g_loss / d w|| + 1e-4) at the decoder's last weight ``w``,
    clamped to [0, max_weight] and detached."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------------------------------------- SoftVQ KL


def entropy(probs: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Shannon entropy (nats) along ``dim``."""
    return -(probs * (probs + eps).log()).sum(dim)


def softvq_kl(probs: torch.Tensor) -> torch.Tensor:
    """SoftVQ's KL objective from soft assignment probabilities (B, L, K) (or (N, K)):
    ``H(q) - H(E_x q)``: confident per-token assignments (low sample entropy) that use the whole codebook on
    average (high entropy of the mean assignment)."""
    p = probs.reshape(-1, probs.shape[-1])
    return entropy(p).mean() - entropy(p.mean(0))


def kl_from_losses(losses: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The SoftVQ KL term from a quantizer's ``losses`` dict: ``entropy`` (= ``sample_entropy -
    avg_entropy``, :mod:`models.quantizers.soft`), or ``kl`` / ``entropy_loss``, else the difference of the
    two entropies, else None."""
    for key in ("entropy", "kl", "kl_loss", "entropy_loss", "softvq_kl"):
        if key in losses:
            return losses[key]
    pairs = (("sample_entropy", "avg_entropy"), ("per_sample_entropy", "codebook_entropy"),
             ("entropy_sample", "entropy_mean"), ("sample_entropy", "mean_entropy"))
    for a, b in pairs:
        if a in losses and b in losses:
            return losses[a] - losses[b]
    return None


# ---------------------------------------------------------------------------------------------- alignment


class TokenAligner(nn.Module):
    """Representation alignment of latent tokens to frozen encoder features through a small MLP.

    ``forward(tokens (B, L, D), feats (B, C, h, w)) -> loss``: the features are flattened to (B, h*w, C) and
    linearly resampled along the token axis to L positions; each token goes through ``Linear(D, hidden) ->
    SiLU -> Linear(hidden, C)``; the loss is ``1 - cosine similarity``, averaged over tokens and batch.
    """

    def __init__(self, token_dim: int, feature_dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(token_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, feature_dim))

    def forward(self, tokens: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        b, length, _ = tokens.shape
        f = feats.flatten(2)  # (B, C, h*w)
        if f.shape[-1] != length:
            f = F.interpolate(f, size=length, mode="linear", align_corners=False)
        f = f.transpose(1, 2)  # (B, L, C)
        pred = self.mlp(tokens)
        return 1.0 - F.cosine_similarity(pred, f.detach(), dim=-1).mean()
