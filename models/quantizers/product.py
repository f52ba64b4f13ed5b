"""Product quantization: split the channels into groups and quantize each group with its own quantizer.

The output is the exact concatenation of the groups' outputs, and the indices gain a trailing group axis.
Groups may be any quantizers (widths may differ), so XQ-GAN's hierarchy composes: a product of residuals of
VQ, a product of multi-scale residual quantizers (ImageFolder's two branches, ``channel_dim=1``), and so on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from models.quantizers.base import Quantizer, QuantizerOutput, prefixed


class ProductQuantizer(Quantizer):
    """Product of ``groups`` over the channel axis ``channel_dim``.

    Args:
        groups: the sub-quantizers, in channel order; group ``g`` takes ``groups[g].dim`` channels.
        channel_dim: the axis holding the channels: ``-1`` for per-vector quantizers on ``(..., D)``, ``1`` for
            multi-scale quantizers on ``(B, C, H, W)``.

    Indices: the groups' index tensors stacked on a new trailing axis ``(..., G)`` (all groups must give the
    same index shape). Losses: the mean over groups of each named loss (for equal widths and MSE losses, the
    loss of the whole tensor). Usage: the groups' usage, prefixed ``group{g}/``.
    """

    def __init__(self, groups: Sequence[Quantizer], *, channel_dim: int = -1) -> None:
        super().__init__()
        if not groups:
            raise ValueError("a product quantizer needs at least one group")
        self.groups = nn.ModuleList(groups)
        self.channel_dim = channel_dim
        self.split_sizes = [q.dim for q in groups]
        self.dim = sum(self.split_sizes)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def codebook_size(self) -> int:  # type: ignore[override]
        sizes = {q.codebook_size for q in self.groups}
        if len(sizes) != 1:
            raise ValueError(f"groups have different codebook sizes {sorted(sizes)}")
        return sizes.pop()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z with ``dim`` channels on ``channel_dim`` -> quantized (same shape), indices (group index shape + (G,))."""
        if z.shape[self.channel_dim] != self.dim:
            raise ValueError(f"expected {self.dim} channels on axis {self.channel_dim}, got {tuple(z.shape)}")
        parts = z.split(self.split_sizes, dim=self.channel_dim)
        outs = [q(part) for q, part in zip(self.groups, parts, strict=True)]
        losses: dict[str, Tensor] = {}
        for out in outs:
            for name, value in out.losses.items():
                losses[name] = losses[name] + value if name in losses else value
        losses = {name: value / self.num_groups for name, value in losses.items()}
        usage: dict[str, Tensor] = {}
        for g, out in enumerate(outs):
            usage.update(prefixed(f"group{g}", out.usage))
        return QuantizerOutput(
            quantized=torch.cat([out.quantized for out in outs], dim=self.channel_dim),
            indices=torch.stack([out.indices for out in outs], dim=-1),
            losses=losses,
            usage=usage,
        )

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (S + (G,)) int64 -> the groups' codes concatenated on ``channel_dim``."""
        if indices.shape[-1] != self.num_groups:
            raise ValueError(
                f"expected a trailing group axis of {self.num_groups}, got {tuple(indices.shape)}"
            )
        parts = [q.indices_to_codes(indices[..., g]) for g, q in enumerate(self.groups)]
        return torch.cat(parts, dim=self.channel_dim)
