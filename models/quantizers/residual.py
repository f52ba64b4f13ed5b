"""Residual quantization (RQ-VAE, SoundStream): each level quantizes what the previous levels left over.

``r_0 = z``, ``q_l = Q_l(r_l)``, ``r_{l+1} = r_l - q_l``, output ``sum_l q_l`` with one straight-through
estimator over the sum (the gradient with respect to ``z`` is the identity). Any quantizer works as a level.

Quantizer dropout (SoundStream): in training, with probability ``dropout_prob`` a level count
``n ~ U{dropout_min_levels .. Q}`` is drawn for the whole batch and levels ``>= n`` are skipped: their indices
are ``-1``, they report no usage and add nothing, so decoders learn to work from any prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from models.quantizers.base import Quantizer, QuantizerOutput, prefixed, straight_through


class ResidualQuantizer(Quantizer):
    """Residual quantization over a list of levels (each a :class:`Quantizer` of the same ``dim``).

    Indices gain a trailing level axis: a level with index shape ``S`` gives ``S + (Q,)``. Losses are summed
    over the levels that ran (RQ-VAE sums its commitment terms over depth).
    """

    def __init__(
        self,
        levels: Sequence[Quantizer],
        *,
        dropout_prob: float = 0.0,
        dropout_min_levels: int = 1,
    ) -> None:
        super().__init__()
        if not levels:
            raise ValueError("a residual quantizer needs at least one level")
        dims = {q.dim for q in levels}
        if len(dims) != 1:
            raise ValueError(f"all levels must quantize the same width, got {sorted(dims)}")
        if not 1 <= dropout_min_levels <= len(levels):
            raise ValueError(f"dropout_min_levels must be in [1, {len(levels)}]")
        self.levels = nn.ModuleList(levels)
        self.dim = dims.pop()
        self.dropout_prob = dropout_prob
        self.dropout_min_levels = dropout_min_levels

    @classmethod
    def build(cls, num_levels: int, make_level: Callable[[int], Quantizer], **kwargs) -> ResidualQuantizer:
        """``num_levels`` levels from ``make_level(level_index)``; keyword arguments go to the constructor."""
        return cls([make_level(i) for i in range(num_levels)], **kwargs)

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:  # type: ignore[override]
        sizes = {q.codebook_size for q in self.levels}
        if len(sizes) != 1:
            raise ValueError(f"levels have different codebook sizes {sorted(sizes)}")
        return sizes.pop()

    def _active_levels(self) -> int:
        if self.training and self.dropout_prob > 0 and torch.rand(()) < self.dropout_prob:
            return int(torch.randint(self.dropout_min_levels, self.num_levels + 1, ()).item())
        return self.num_levels

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (shape accepted by the levels) -> quantized (same shape), indices (level index shape + (Q,))."""
        n_active = self._active_levels()
        residual = z
        codes_sum = torch.zeros_like(z)
        indices: list[Tensor] = []
        losses: dict[str, Tensor] = {}
        usage: dict[str, Tensor] = {}
        for level, quantizer in enumerate(self.levels):
            if level >= n_active:
                indices.append(torch.full_like(indices[0], -1))
                continue
            out = quantizer(residual)
            codes = out.quantized.detach()
            codes_sum = codes_sum + codes
            residual = residual - codes
            indices.append(out.indices)
            for name, value in out.losses.items():
                losses[name] = losses[name] + value if name in losses else value
            usage.update(prefixed(f"level{level}", out.usage))
        return QuantizerOutput(
            quantized=straight_through(z, codes_sum),
            indices=torch.stack(indices, dim=-1),
            losses=losses,
            usage=usage,
        )

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (S + (Q,)) int64, ``-1`` for dropped levels -> the summed codes of the levels."""
        if indices.shape[-1] != self.num_levels:
            raise ValueError(
                f"expected a trailing level axis of {self.num_levels}, got {tuple(indices.shape)}"
            )
        total = self.levels[0].indices_to_codes(indices[..., 0])
        for level in range(1, self.num_levels):
            total = total + self.levels[level].indices_to_codes(indices[..., level])
        return total
