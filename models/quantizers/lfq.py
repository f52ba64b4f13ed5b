"""Lookup-free quantization (LFQ, MAGVIT-v2): each channel is quantized to its sign, ``q_i = s * sign(z_i)``.

The implicit codebook is ``{-s, +s}^D`` (V = 2^D); the index of a code is its bit pattern read little-endian,
``sum_i [z_i > 0] * 2^i`` (the XQ-GAN convention). There are no codebook parameters.

Losses: ``commitment = beta * ||z - sg(q)||^2`` and the entropy loss
``entropy = entropy_weight * (sample_weight * E[H(p(c|z))] - batch_weight * H(E[p(c|z)]))``
with ``p(c|z) = softmax(2 z.c / temperature)`` (the negative squared distance up to a constant): low per-sample
entropy makes assignments confident, high batch entropy spreads the use of codes.

``entropy_mode="exact"`` enumerates all 2^D codes (cost O(N 2^D); D <= 16). ``"factorized"`` uses the per-bit
form: ``p(c_i = +s | z) = sigmoid(4 s z_i / temperature)``; the sample entropy is then exact (the sum of the
bits' entropies) and the batch entropy is replaced by the sum of the bits' batch entropies (an upper bound).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from models.quantizers.base import Quantizer, QuantizerOutput, hit_counts, straight_through, update_usage_ema

EntropyMode = Literal["exact", "factorized"]
_MAX_EXACT_BITS = 16
_MAX_COUNTED_BITS = 20


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(dim)


def _binary_entropy(p: Tensor) -> Tensor:
    return _entropy(torch.stack([p, 1.0 - p], dim=-1))


class LookupFreeQuantizer(Quantizer):
    """LFQ over the last axis: z (..., D) -> codes in ``{-s, +s}^D``, indices (...) in ``[0, 2^D)``.

    Args:
        dim: D, the number of bits.
        code_scale: s, the magnitude of a code value.
        beta: weight of the commitment loss.
        entropy_weight, sample_weight, batch_weight, entropy_temperature: the entropy loss (module docstring).
        entropy_mode: ``"exact"`` or ``"factorized"``.
        sphere: l2-normalise z first and use ``s / sqrt(D)`` (binary spherical quantization, see ``bsq.py``).
        usage_decay: decay of ``usage_ema`` (kept when 2^D <= 2^20, like the per-call usage counts).
    """

    def __init__(
        self,
        dim: int,
        *,
        code_scale: float = 1.0,
        beta: float = 0.25,
        entropy_weight: float = 0.1,
        sample_weight: float = 1.0,
        batch_weight: float = 1.0,
        entropy_temperature: float = 0.01,
        entropy_mode: EntropyMode = "exact",
        sphere: bool = False,
        usage_decay: float = 0.99,
    ) -> None:
        super().__init__()
        if not 1 <= dim <= 62:
            raise ValueError("LFQ needs 1 <= dim <= 62 bits (int64 indices)")
        if entropy_mode == "exact" and dim > _MAX_EXACT_BITS:
            raise ValueError(f"exact entropy enumerates 2^{dim} codes; use entropy_mode='factorized'")
        self.dim = dim
        self.codebook_size = 2**dim
        self.sphere = sphere
        self.scale = code_scale / math.sqrt(dim) if sphere else code_scale
        self.beta = beta
        self.entropy_weight = entropy_weight
        self.sample_weight = sample_weight
        self.batch_weight = batch_weight
        self.entropy_temperature = entropy_temperature
        self.entropy_mode = entropy_mode
        self.usage_decay = usage_decay
        self.register_buffer("bit_values", 2 ** torch.arange(dim, dtype=torch.long), persistent=False)
        self.track_usage = dim <= _MAX_COUNTED_BITS
        if self.track_usage:
            self.register_buffer("usage_ema", torch.zeros(self.codebook_size), persistent=False)

    def codebook(self) -> Tensor:
        """All 2^D codes in index order (V, D); only for small D."""
        return self.indices_to_codes(torch.arange(self.codebook_size, device=self.bit_values.device))

    def bits_to_indices(self, bits: Tensor) -> Tensor:
        """bits (..., D) bool -> indices (...) int64, little-endian."""
        return (bits.long() * self.bit_values).sum(-1)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (..., D) float -> quantized (..., D) in ``{-s, +s}^D``, indices (...) int64."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected last axis {self.dim}, got shape {tuple(z.shape)}")
        if self.sphere:
            z = F.normalize(z, dim=-1)
        bits = z > 0
        codes = torch.where(bits, self.scale, -self.scale).to(z.dtype)
        indices = self.bits_to_indices(bits)
        losses = {
            "commitment": self.beta * F.mse_loss(z, codes.detach()),
            "entropy": self.entropy_weight * self.entropy_loss(z) if self.entropy_weight else z.new_zeros(()),
        }
        usage: dict[str, Tensor] = {}
        if self.track_usage:
            counts = hit_counts(indices, self.codebook_size)
            usage["codebook"] = counts
            if self.training:
                update_usage_ema(self.usage_ema, counts, self.usage_decay)
        return QuantizerOutput(straight_through(z, codes), indices, losses, usage)

    def entropy_terms(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(mean per-sample entropy, batch (codebook) entropy) of the soft assignment of z (..., D)."""
        flat = z.reshape(-1, self.dim).float()
        if self.entropy_mode == "exact":
            logits = 2.0 * flat @ self.codebook().float().t() / self.entropy_temperature  # (N, V)
            probs = logits.softmax(-1)
            sample = -(probs * logits.log_softmax(-1)).sum(-1).mean()
            return sample, _entropy(probs.mean(0))
        p_plus = torch.sigmoid(4.0 * self.scale * flat / self.entropy_temperature)  # (N, D)
        sample = _binary_entropy(p_plus).sum(-1).mean()
        return sample, _binary_entropy(p_plus.mean(0)).sum()

    def entropy_loss(self, z: Tensor) -> Tensor:
        """Unweighted entropy loss ``sample_weight * E[H] - batch_weight * H(E[p])`` of z (..., D)."""
        sample, batch = self.entropy_terms(z)
        return self.sample_weight * sample - self.batch_weight * batch

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (...) int64 (``-1``: zero code) -> codes (..., D) in ``{-s, +s}^D``."""
        bits = (indices.clamp_min(0).unsqueeze(-1) & self.bit_values) != 0
        codes = torch.where(bits, self.scale, -self.scale).to(torch.float32)
        return codes * (indices >= 0).unsqueeze(-1).to(codes.dtype)
