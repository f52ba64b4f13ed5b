"""XQ-GAN losses: GAN objectives (hinge, non-saturating, vanilla), the adaptive weight with a start step, the
LeCAM regulariser, and the CLIP-style contrastive alignment of quantized tokens with frozen-encoder features.

GAN losses take discriminator logits of any shape (patch maps (B, 1, h, w), per-image (B, 1), per-token
(B, N)) and return scalars:

    hinge           D: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])     G: -E[D(G(z))]
    non-saturating  D: 0.5 * (E[softplus(-D(x))] + E[softplus(D(G(z)))])    G: E[softplus(-D(G(z)))]
    vanilla         D: as non-saturating                                     G: -E[softplus(D(G(z)))]

(``non-saturating`` here is the correct form; the LlamaGen / XQ-GAN code swaps the BCE arguments,
FORMATS-MAR-XQV.md 2.3.) ``vanilla`` is the original minimax generator loss, which saturates.

Contrastive alignment (FORMATS-MAR-XQV.md 2.4, open_clip's ClipLoss): with f1 (B, D) frozen-encoder features
projected to the token width and f2 (B, D) the spatial mean of one quantizer group's tokens,
``0.5 * [CE(s * f1 f2^T, I) + CE(s * f2 f1^T, I)]``, the other images of the batch being the negatives and
``s = 1 / temperature``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from training.losses import adaptive_weight, hinge_d_loss, hinge_g_loss

GanLoss = Literal["hinge", "non-saturating", "vanilla"]
GAN_LOSSES: tuple[str, ...] = ("hinge", "non-saturating", "vanilla")


# ---------------------------------------------------------------------------------------------- GAN


def d_loss(kind: str, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator loss of ``kind`` (module docstring) from logits on real and generated images."""
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind in ("non-saturating", "vanilla"):
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise ValueError(f"unknown GAN loss {kind!r}; choose from {GAN_LOSSES}")


def g_loss(kind: str, logits_fake: Tensor) -> Tensor:
    """Generator loss of ``kind`` from the discriminator's logits on generated images."""
    if kind == "hinge":
        return hinge_g_loss(logits_fake)
    if kind == "non-saturating":
        return F.softplus(-logits_fake).mean()
    if kind == "vanilla":
        return -F.softplus(logits_fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; choose from {GAN_LOSSES}")


def adversarial_weight(
    nll: Tensor,
    gen_loss: Tensor,
    last_layer: Tensor,
    *,
    step: int,
    start: int,
    disc_weight: float,
    adaptive: bool = True,
    max_weight: float = 1e4,
) -> Tensor:
    """The weight of the generator's adversarial term at ``step``: 0 before ``start``; after it
    ``disc_weight * lambda`` with ``lambda = ||grad nll|| / (||grad gen_loss|| + 1e-4)`` at ``last_layer``
    (the decoder's last weight), clamped to [0, max_weight] and detached; ``disc_weight`` alone when
    ``adaptive`` is off. Returns a scalar tensor."""
    if step < start:
        return nll.new_zeros(())
    if not adaptive:
        return nll.new_tensor(float(disc_weight))
    return disc_weight * adaptive_weight(nll, gen_loss, last_layer, max_weight=max_weight)


class LeCAM(nn.Module):
    """LeCAM regulariser (Tseng et al. 2021), as XQ-GAN uses it: EMAs of the mean real / fake logits
    (``decay`` 0.999) and ``mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(G(z)))^2)``."""

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def forward(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        real, fake = logits_real.detach().float().mean(), logits_fake.detach().float().mean()
        if self.training:
            with torch.no_grad():
                if not bool(self.started):
                    self.ema_real.copy_(real)
                    self.ema_fake.copy_(fake)
                    self.started.fill_(True)
                else:
                    self.ema_real.lerp_(real, 1.0 - self.decay)
                    self.ema_fake.lerp_(fake, 1.0 - self.decay)
        return (
            F.relu(logits_real - self.ema_fake).pow(2).mean()
            + F.relu(self.ema_real - logits_fake).pow(2).mean()
        )


# ---------------------------------------------------------------------------------------------- alignment


def clip_loss(f1: Tensor, f2: Tensor, logit_scale: float | Tensor = 1.0) -> Tensor:
    """Symmetric InfoNCE over in-batch pairs: f1, f2 (B, D), row i of each a positive pair, every other row a
    negative. ``0.5 * [CE(s f1 f2^T, arange) + CE(s f2 f1^T, arange)]`` in float32."""
    if f1.shape != f2.shape or f1.dim() != 2:
        raise ValueError(
            f"expected two (B, D) tensors of one shape, got {tuple(f1.shape)} and {tuple(f2.shape)}"
        )
    if f1.shape[0] < 2:
        raise ValueError("the contrastive loss needs at least 2 samples (in-batch negatives)")
    logits = logit_scale * f1.float() @ f2.float().t()
    labels = torch.arange(f1.shape[0], device=f1.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def pooled_group(tokens: Tensor, num_groups: int, group: int = -1) -> Tensor:
    """Spatial mean of one quantizer group's tokens: tokens (B, d, h, w) channel-first (or (B, L, d)
    channel-last when 3-d), split into ``num_groups`` equal channel groups -> (B, d / num_groups)."""
    if tokens.dim() == 4:
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, h*w, d)
    if tokens.dim() != 3 or tokens.shape[-1] % num_groups:
        raise ValueError(f"cannot split tokens {tuple(tokens.shape)} into {num_groups} channel groups")
    width = tokens.shape[-1] // num_groups
    return tokens.split(width, dim=-1)[group].mean(dim=1)


class ContrastiveAlignment(nn.Module):
    """CLIP-style alignment of one quantizer group with frozen-encoder features (module docstring).

    ``forward(tokens, features) -> loss``: ``tokens`` (B, d, h, w) (or (B, L, d)) is the quantized map,
    ``features`` (B, C, h', w') (or (B, C)) come from the frozen encoder. The features are mean-pooled and
    projected to the group width by a learned linear map (XQ-GAN reuses its ``quant_conv`` for this; here the
    frozen encoder's width differs, so the projection is its own); the group's tokens are mean-pooled. With
    ``normalize`` both sides are l2-normalised first (``clip_norm``); the logit scale is ``1 / temperature``.
    """

    def __init__(
        self,
        token_dim: int,
        feature_dim: int,
        *,
        num_groups: int = 1,
        group: int = -1,
        temperature: float = 0.1,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if token_dim % num_groups:
            raise ValueError(f"token_dim {token_dim} not divisible by num_groups {num_groups}")
        if not -num_groups <= group < num_groups:
            raise ValueError(f"group {group} out of range for {num_groups} groups")
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.num_groups, self.group = num_groups, group
        self.temperature, self.normalize = temperature, normalize
        self.proj = nn.Linear(feature_dim, token_dim // num_groups)

    def embeddings(self, tokens: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
        """(f1 from the features, f2 from the tokens), each (B, d / P), normalised when ``normalize``."""
        pooled = features.float().flatten(2).mean(-1) if features.dim() > 2 else features.float()
        f1 = self.proj(pooled.detach())
        f2 = pooled_group(tokens.float(), self.num_groups, self.group)
        if self.normalize:
            f1, f2 = F.normalize(f1, dim=-1), F.normalize(f2, dim=-1)
        return f1, f2

    def forward(self, tokens: Tensor, features: Tensor) -> Tensor:
        f1, f2 = self.embeddings(tokens, features)
        return clip_loss(f1, f2, 1.0 / self.temperature)


__all__ = [
    "GAN_LOSSES",
    "ContrastiveAlignment",
    "LeCAM",
    "adversarial_weight",
    "clip_loss",
    "d_loss",
    "g_loss",
    "pooled_group",
]
