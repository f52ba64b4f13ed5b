"""CODA: attention-based multi-scale residual quantization of a continuous VAE latent (FORMATS.md 3.2-3.3).

Assignment of a latent vector ``x`` (C) against the codebook ``E`` (V, C):

    q = RMSNorm(to_q(x)),  k = RMSNorm(to_k(E))            # C -> attn_dim, eps 1e-5, learnable weight
    logits = q k^T / sqrt(attn_dim);  idx = argmax(logits)
    code = to_v(E)[idx]                                      # a value projection of the code, not E[idx]

Training uses the hard one-hot with a straight-through estimator to the softmax of the logits, so gradients
reach the input (through ``to_q``), the codebook and all projections; the forward value is always the hard code.

Residual levels: for each patch size ``p`` the residual is area-downsampled to ``p x p``, assigned, the chosen
values bicubic-upsampled to full size, added to ``f_hat`` and subtracted from the residual. One codebook is
shared by all scales and there is no ``Phi`` conv. The output is ``f_hat`` itself (no outer straight-through:
the input's gradient comes through the soft assignment, as in the published quantizer).

Losses (mean over scales): ``quant = mse(z_q, x) + mse(sg(code), x) + beta * mse(code, sg(x))`` and
``entropy = entropy_weight * (E[H(p)] - H(E[p]))`` with ``p = softmax(logits / entropy_temperature)``.

Names follow the published files: ``codebooks.weight (V, C)``, ``attn.to_q/to_k (attn_dim, C)``,
``attn.to_v (C, C)`` (all with bias), ``attn.norm_q.weight / attn.norm_k.weight (attn_dim)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.quantizers.base import Quantizer, QuantizerOutput, embed_or_zero, hit_counts, update_usage_ema

MAR_SCALES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # CODA mar_v16384, 16x16 latent
FLUX_SCALES: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # CODA flux_v65536, 32x32 latent


class CODAAttention(nn.Module):
    """The attention assigner: query/key projections with RMSNorm and a value projection of the codebook."""

    def __init__(self, dim: int, attn_dim: int, *, rms_norm: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.attn_dim = attn_dim
        self.to_q = nn.Linear(dim, attn_dim)
        self.to_k = nn.Linear(dim, attn_dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q: nn.Module = nn.RMSNorm(attn_dim, eps=eps) if rms_norm else nn.Identity()
        self.norm_k: nn.Module = nn.RMSNorm(attn_dim, eps=eps) if rms_norm else nn.Identity()

    def keys(self, codebook: Tensor) -> Tensor:
        """codebook (V, C) -> normalised keys (V, attn_dim)."""
        return self.norm_k(self.to_k(codebook))

    def logits(self, x: Tensor, keys: Tensor) -> Tensor:
        """x (N, C), keys (V, attn_dim) -> (N, V)."""
        return self.norm_q(self.to_q(x)) @ keys.t() / math.sqrt(self.attn_dim)

    def values(self, codebook: Tensor) -> Tensor:
        """codebook (V, C) -> the emitted codes (V, C)."""
        return self.to_v(codebook)


class CODAQuantizer(Quantizer):
    """CODA multi-scale residual quantizer on z (B, C, H, W) with ``H == W == scales[-1]``.

    Args:
        codebook_size: V.
        dim: C, the latent channels (16 for the MAR and FLUX VAEs).
        scales: patch sizes, coarse to fine.
        attn_dim: width of queries and keys (32 in both releases).
        rms_norm: RMSNorm on queries and keys (both releases).
        beta, entropy_weight, entropy_temperature: losses (module docstring).
        usage_decay: decay of ``usage_ema`` (S, V), a non-persistent running hit count (training mode).

    Indices: (B, sum(p * p)) int64 (680 for the MAR scales), scales concatenated coarse to fine, row-major.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int = 16,
        scales: Sequence[int] = MAR_SCALES,
        *,
        attn_dim: int = 32,
        rms_norm: bool = True,
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        usage_decay: float = 0.99,
    ) -> None:
        super().__init__()
        if not scales:
            raise ValueError("need at least one scale")
        self.codebook_size = codebook_size
        self.dim = dim
        self.scales = tuple(int(p) for p in scales)
        self.beta = beta
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.usage_decay = usage_decay
        self.codebooks = nn.Embedding(codebook_size, dim)
        self.attn = CODAAttention(dim, attn_dim, rms_norm=rms_norm)
        self.register_buffer("usage_ema", torch.zeros(len(self.scales), codebook_size), persistent=False)

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.scales)

    def split_indices(self, indices: Tensor) -> list[Tensor]:
        """(B, L) -> one (B, p * p) tensor per scale."""
        if indices.shape[-1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} indices per sample, got {tuple(indices.shape)}")
        return list(indices.split([p * p for p in self.scales], dim=-1))

    def code_values(self) -> Tensor:
        """The emitted code of every index: ``to_v(codebooks.weight)`` (V, C)."""
        return self.attn.values(self.codebooks.weight)

    def _upsample(self, codes: Tensor) -> Tensor:
        side = self.scales[-1]
        if codes.shape[-1] == side:
            return codes  # bicubic resampling to the same size is the identity
        return F.interpolate(codes, size=(side, side), mode="bicubic")

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, C, H, W) -> quantized (B, C, H, W), indices (B, L) int64."""
        B, C, H, W = z.shape
        if C != self.dim or H != W or H != self.scales[-1]:
            raise ValueError(
                f"expected (B, {self.dim}, {self.scales[-1]}, {self.scales[-1]}), got {tuple(z.shape)}"
            )
        keys = self.attn.keys(self.codebooks.weight)
        values = self.code_values()
        residual = z
        f_hat = torch.zeros_like(z)
        quant_losses: list[Tensor] = []
        entropy_losses: list[Tensor] = []
        all_indices: list[Tensor] = []
        usage: dict[str, Tensor] = {}
        for si, p in enumerate(self.scales):
            small = residual if p == H else F.interpolate(residual, size=(p, p), mode="area")
            x = small.permute(0, 2, 3, 1).reshape(-1, C)  # (N, C)
            logits = self.attn.logits(x, keys)  # (N, V)
            idx = logits.argmax(dim=-1)
            hard = values[idx]
            if self.training:
                soft = logits.softmax(dim=-1) @ values
                z_q = hard + (soft - soft.detach())
            else:
                z_q = hard
            quant_losses.append(
                F.mse_loss(z_q, x) + F.mse_loss(hard.detach(), x) + self.beta * F.mse_loss(hard, x.detach())
            )
            entropy_losses.append(self._entropy_loss(logits) if self.entropy_weight else x.new_zeros(()))
            h = self._upsample(z_q.view(B, p, p, C).permute(0, 3, 1, 2))
            f_hat = f_hat + h
            residual = residual - h
            idx = idx.view(B, p * p)
            all_indices.append(idx)
            counts = hit_counts(idx, self.codebook_size)
            usage[f"scale{si}"] = counts
            if self.training:
                update_usage_ema(self.usage_ema[si], counts, self.usage_decay)
        return QuantizerOutput(
            quantized=f_hat,
            indices=torch.cat(all_indices, dim=1),
            losses={
                "quant": torch.stack(quant_losses).mean(),
                "entropy": self.entropy_weight * torch.stack(entropy_losses).mean(),
            },
            usage=usage,
        )

    def _entropy_loss(self, logits: Tensor) -> Tensor:
        """Per-sample entropy minus batch entropy of softmax(logits / T), logits (N, V)."""
        scaled = logits / self.entropy_temperature
        probs = scaled.softmax(dim=-1)
        sample = -(probs * scaled.log_softmax(dim=-1)).sum(-1).mean()
        avg = probs.mean(0)
        batch = -(avg * avg.clamp_min(1e-12).log()).sum()
        return sample - batch

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (B, L) int64 (``-1``: zero code) -> f_hat (B, C, H, W): ``to_v(codebooks.weight)[idx]``
        per scale, bicubic-upsampled and summed."""
        values = self.code_values()
        side = self.scales[-1]
        f_hat = values.new_zeros(indices.shape[0], self.dim, side, side)
        for p, idx in zip(self.scales, self.split_indices(indices), strict=True):
            codes = embed_or_zero(idx, values).view(-1, p, p, self.dim).permute(0, 3, 1, 2)
            f_hat = f_hat + self._upsample(codes)
        return f_hat
