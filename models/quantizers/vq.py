"""Vector quantization (VQ-VAE): nearest code by Euclidean distance or cosine similarity, straight-through.

Losses (van den Oord et al. 2017): ``codebook = ||sg(z) - e||^2`` (absent with the EMA codebook, which is
updated by moving averages instead, Razavi et al. 2019) and ``commitment = beta * ||z - sg(e)||^2``.
With ``cosine=True`` both ``z`` and the codebook are l2-normalised before matching and the output is the
normalised code (the XQ-GAN / LlamaGen ``codebook_l2_norm`` convention).

The codebook is ``embedding.weight`` (V, D), as in the published XQ-GAN checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.quantizers.base import (
    Quantizer,
    QuantizerOutput,
    embed_or_zero,
    hit_counts,
    straight_through,
    update_usage_ema,
)


class VectorQuantizer(Quantizer):
    """Nearest-neighbour VQ over the last axis.

    Args:
        codebook_size: V, the number of codes.
        dim: D, the code width.
        cosine: match by cosine similarity on l2-normalised vectors (output is the normalised code).
        beta: weight of the commitment loss.
        ema: update the codebook by exponential moving averages of assigned vectors (no codebook loss,
            ``embedding.weight`` is then a non-trainable parameter).
        ema_decay, ema_eps: EMA decay and the Laplace smoothing of cluster sizes.
        usage_decay: decay of ``usage_ema`` (V,), the running hit counts updated in training mode.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        *,
        cosine: bool = False,
        beta: float = 0.25,
        ema: bool = False,
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        usage_decay: float = 0.99,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.cosine = cosine
        self.beta = beta
        self.ema = ema
        self.ema_decay = ema_decay
        self.ema_eps = ema_eps
        self.usage_decay = usage_decay
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if cosine:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(torch.randn(codebook_size, dim), dim=-1))
        if ema:
            self.embedding.weight.requires_grad_(False)
            # EMA of the number of vectors assigned to each code; the running sum of those vectors is
            # ``embedding.weight * ema_cluster_size``, so the weights themselves are the other EMA state.
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
        self.register_buffer("usage_ema", torch.zeros(codebook_size), persistent=False)

    def codebook(self) -> Tensor:
        """The codes as matched and emitted (V, D): normalised when ``cosine``."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.cosine else weight

    @torch.no_grad()
    def assign(self, z: Tensor) -> Tensor:
        """Nearest code of each vector: z (..., D) -> indices (...) int64."""
        flat = z.reshape(-1, self.dim).float()
        codebook = self.codebook().float()
        if self.cosine:
            idx = (F.normalize(flat, dim=-1) @ codebook.t()).argmax(dim=-1)
        else:
            dist = flat.square().sum(-1, keepdim=True) - 2.0 * flat @ codebook.t() + codebook.square().sum(-1)
            idx = dist.argmin(dim=-1)
        return idx.view(z.shape[:-1])

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (..., D) float -> quantized (..., D), indices (...) int64."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected last axis {self.dim}, got shape {tuple(z.shape)}")
        if self.cosine:
            z = F.normalize(z, dim=-1)
        indices = self.assign(z)
        codes = F.embedding(indices, self.codebook()).to(z.dtype)
        commitment = self.beta * F.mse_loss(z, codes.detach())
        codebook_loss = z.new_zeros(()) if self.ema else F.mse_loss(codes, z.detach())
        counts = hit_counts(indices, self.codebook_size)
        if self.training:
            update_usage_ema(self.usage_ema, counts, self.usage_decay)
            if self.ema:
                self._ema_update(z.detach(), indices, counts)
        return QuantizerOutput(
            quantized=straight_through(z, codes),
            indices=indices,
            losses={"codebook": codebook_loss, "commitment": commitment},
            usage={"codebook": counts},
        )

    @torch.no_grad()
    def _ema_update(self, z: Tensor, indices: Tensor, counts: Tensor) -> None:
        """Codes <- EMA of the vectors assigned to them (Laplace-smoothed cluster sizes)."""
        flat = z.reshape(-1, self.dim).float()
        weight = self.embedding.weight
        batch_sum = torch.zeros_like(weight).index_add_(0, indices.reshape(-1), flat)
        running_sum = weight * self.ema_cluster_size.unsqueeze(-1)
        running_sum.mul_(self.ema_decay).add_(batch_sum, alpha=1.0 - self.ema_decay)
        self.ema_cluster_size.mul_(self.ema_decay).add_(counts, alpha=1.0 - self.ema_decay)
        n = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + self.ema_eps) / (n + self.codebook_size * self.ema_eps) * n
        weight.copy_(running_sum / size.unsqueeze(-1))

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (...) int64 (``-1``: zero code) -> codes (..., D), the ``quantized`` value of the forward."""
        return embed_or_zero(indices, self.codebook())
