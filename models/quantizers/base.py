"""The contract every discrete quantizer follows: one typed return record and an ``indices_to_codes`` inverse.

Every quantizer is an ``nn.Module`` with

* ``forward(z) -> QuantizerOutput``: ``quantized`` has the shape of ``z`` and carries gradients to ``z``
  (straight-through, or a soft assignment for CODA); ``indices`` are int64 codes; ``losses`` are ready to sum
  (each already multiplied by the quantizer's own weight, e.g. ``beta`` for the commitment term);
  ``usage`` maps a codebook name to its hit counts in this call.
* ``indices_to_codes(indices) -> quantized``: the exact inverse on indices, so that
  ``indices_to_codes(forward(z).indices) == forward(z).quantized`` (up to float round-off of the
  straight-through arithmetic). An index of ``-1`` means "dropped" (quantizer dropout) and decodes to a
  zero code in every quantizer, so composites can decode any prefix of their levels.
* attributes ``dim`` (channels quantized) and ``codebook_size`` (values one index can take).

Index layouts:

* per-vector quantizers (VQ, LFQ, BSQ) take ``z (..., D)`` channel-last and give ``indices (...)``;
* ``ResidualQuantizer`` appends a level axis: ``(..., Q)``;
* ``ProductQuantizer`` appends a group axis: ``(..., G)`` (so a product of residuals gives ``(..., Q, G)``);
* multi-scale quantizers (MSRQ, CODA) take ``z (B, C, H, W)`` and give ``(B, sum(p*p for p in scales))``,
  the scales concatenated from coarse to fine, each row-major.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class QuantizerOutput:
    """What every quantizer returns.

    quantized: float, the shape of the input; differentiable with respect to the input.
    indices: int64 codes (layout in the module docstring); ``-1`` marks a dropped level.
    losses: name -> scalar tensor, already weighted; ``sum(losses.values())`` is the auxiliary loss.
    usage: codebook name -> float hit counts of this call, shape (V,). Composites prefix the names of their
        parts (``level0/codebook``, ``group1/scale3``).
    probs: the soft assignment (..., V) for soft quantizers (SoftVQ); ``None`` for the hard ones here.
    """

    quantized: Tensor
    indices: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    usage: dict[str, Tensor] = field(default_factory=dict)
    probs: Tensor | None = None

    @property
    def loss(self) -> Tensor:
        """The sum of all auxiliary losses (a zero scalar on the output's device when there are none)."""
        total = self.quantized.new_zeros(())
        for value in self.losses.values():
            total = total + value
        return total


class Quantizer(nn.Module, ABC):
    """Base class of all discrete quantizers (see the module docstring for the contract)."""

    dim: int
    codebook_size: int

    @abstractmethod
    def forward(self, z: Tensor) -> QuantizerOutput:  # pragma: no cover - abstract
        ...

    @abstractmethod
    def indices_to_codes(self, indices: Tensor) -> Tensor:  # pragma: no cover - abstract
        ...


def straight_through(z: Tensor, codes: Tensor) -> Tensor:
    """Forward value ``codes``, gradient of the identity with respect to ``z`` (same shape)."""
    return z + (codes - z).detach()


def embed_or_zero(indices: Tensor, codebook: Tensor) -> Tensor:
    """indices (...) int64 with ``-1`` for dropped -> rows of ``codebook (V, D)``, zeros where dropped: (..., D)."""
    codes = F.embedding(indices.clamp_min(0), codebook)
    return codes * (indices >= 0).unsqueeze(-1).to(codes.dtype)


def hit_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """Float counts (V,) of each code among ``indices`` (any shape, int64); ``-1`` entries are not counted."""
    flat = indices.reshape(-1)
    flat = flat[flat >= 0]
    return torch.bincount(flat, minlength=codebook_size).to(torch.float32)


def update_usage_ema(ema: Tensor, counts: Tensor, decay: float) -> None:
    """In place: ``ema <- decay * ema + (1 - decay) * counts`` (both (V,) float)."""
    ema.mul_(decay).add_(counts.to(ema.dtype), alpha=1.0 - decay)


def codebook_utilization(counts: Tensor, threshold: float = 0.0) -> float:
    """Fraction of codes whose count (or EMA count) exceeds ``threshold``; ``counts`` (..., V)."""
    return (counts > threshold).float().mean().item()


def perplexity(counts: Tensor) -> float:
    """exp(entropy) of the code distribution given by ``counts`` (V,); V means uniform use, 1 a collapse."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def prefixed(prefix: str, mapping: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{prefix/key: value}`` for composing usage dictionaries."""
    return {f"{prefix}/{k}": v for k, v in mapping.items()}
