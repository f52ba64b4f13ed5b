"""Multi-scale residual quantization (VAR / XQ-GAN / ImageFolder), with the shared 3x3 ``Phi`` convolutions.

For each scale ``p`` (coarse to fine, the last equal to the latent side):

1. area-downsample the residual to ``p x p``;
2. pick the nearest code (cosine on l2-normalised vectors, or Euclidean) from one codebook shared by all scales;
3. bicubic-upsample the **un-normalised** code map to full size (not at the last scale);
4. apply ``Phi``: ``h * (1 - r) + conv3x3(h) * r`` with ``r = 0.5``, the conv chosen among ``K`` shared ones
   (``share_quant_resi``) by the tick nearest to ``si / (S - 1)``;
5. add to ``f_hat`` and subtract from the residual.

Parameter and buffer names follow the published checkpoints (FORMATS.md 2.3): ``embedding.weight (V, C)``,
``quant_resi.qresi_ls.{k}.{weight (C, C, 3, 3), bias}``, ``ema_vocab_hit_SV (S, V)``.

Losses (mean over scales, as published): ``codebook = mse(f_hat_s, sg(f))`` (trains the codebook and the
``Phi`` convs) and ``commitment = beta * mse(sg(f_hat_s), f)``. The output is straight-through.

Quantizer dropout (XQ-GAN ``codebook_drop`` / ``start_drop``): in training each sample, with probability
``dropout_prob``, keeps only its first ``n ~ U{dropout_start .. S}`` scales; its later indices are ``-1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.quantizers.base import Quantizer, QuantizerOutput, embed_or_zero, hit_counts, straight_through

IMAGEFOLDER_SCALES: tuple[int, ...] = (1, 1, 2, 3, 3, 4, 5, 6, 8, 11)  # MSVR10P2 ``v_patch_nums``


class Phi(nn.Conv2d):
    """``h * (1 - r) + conv3x3(h) * r`` on (B, C, H, W)."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__(dim, dim, kernel_size=3, stride=1, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: Tensor) -> Tensor:
        return h * (1.0 - self.ratio) + super().forward(h) * self.ratio


class SharedPhi(nn.Module):
    """``count`` Phi convs shared across scales (``qresi_ls``), picked by the nearest tick."""

    def __init__(self, dim: int, ratio: float, count: int) -> None:
        super().__init__()
        if count < 1:
            raise ValueError("share_quant_resi must be >= 1")
        identity = abs(ratio) <= 1e-6
        self.qresi_ls = nn.ModuleList([nn.Identity() if identity else Phi(dim, ratio) for _ in range(count)])
        k = count
        # The published expressions, kept verbatim: ties (e.g. scale 2 of 10 is equally far from ticks 0 and 1)
        # are broken by float round-off, so the order of operations matters.
        if k == 4:
            self.ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k)
        else:
            self.ticks = np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)

    def index_for(self, si: int, num_scales: int) -> int:
        """Which conv scale ``si`` of ``num_scales`` uses."""
        at = si / (num_scales - 1) if num_scales > 1 else 0.0
        return int(np.argmin(np.abs(self.ticks - at)))

    def for_scale(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi_ls[self.index_for(si, num_scales)]


class MultiScaleResidualQuantizer(Quantizer):
    """Multi-scale residual VQ on z (B, C, H, W) with ``H == W == scales[-1]``.

    Args:
        codebook_size: V (one codebook shared by all scales).
        dim: C.
        scales: the side ``p`` of each scale's token map, coarse to fine (``v_patch_nums``).
        cosine: cosine matching (``codebook_l2_norm`` / ``using_znorm``); the emitted code is un-normalised.
        beta: commitment weight.
        quant_resi: the Phi ratio ``r`` (0 disables Phi).
        share_quant_resi: K, the number of shared Phi convs.
        dropout_prob, dropout_start: quantizer dropout (module docstring).

    Indices: (B, sum(p * p)) int64, scales concatenated coarse to fine, each row-major.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        scales: Sequence[int] = IMAGEFOLDER_SCALES,
        *,
        cosine: bool = True,
        beta: float = 0.25,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        dropout_prob: float = 0.0,
        dropout_start: int = 3,
    ) -> None:
        super().__init__()
        if not scales:
            raise ValueError("need at least one scale")
        self.codebook_size = codebook_size
        self.dim = dim
        self.scales = tuple(int(p) for p in scales)
        self.cosine = cosine
        self.beta = beta
        self.dropout_prob = dropout_prob
        self.dropout_start = max(1, min(dropout_start, len(self.scales)))
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if cosine:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.quant_resi = SharedPhi(dim, quant_resi, share_quant_resi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.scales), codebook_size))
        self.record_hit = 0

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def num_tokens(self) -> int:
        """L = sum of p * p over the scales (286 for the ImageFolder scales)."""
        return sum(p * p for p in self.scales)

    def split_indices(self, indices: Tensor) -> list[Tensor]:
        """(B, L) -> one (B, p * p) tensor per scale."""
        if indices.shape[-1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} indices per sample, got {tuple(indices.shape)}")
        return list(indices.split([p * p for p in self.scales], dim=-1))

    @torch.no_grad()
    def assign(self, rest: Tensor) -> Tensor:
        """Nearest code of each position of rest (B, C, p, p) -> (B, p * p) int64."""
        flat = rest.permute(0, 2, 3, 1).reshape(-1, self.dim).float()
        weight = self.embedding.weight.float()
        if self.cosine:
            idx = (F.normalize(flat, dim=-1) @ F.normalize(weight, dim=-1).t()).argmax(dim=1)
        else:
            dist = flat.square().sum(1, keepdim=True) - 2.0 * flat @ weight.t() + weight.square().sum(1)
            idx = dist.argmin(dim=1)
        return idx.view(rest.shape[0], -1)

    def scale_contribution(self, si: int, codes: Tensor) -> Tensor:
        """The term scale ``si`` adds to f_hat: codes (B, C, p, p) -> (B, C, H, W) (upsample, then Phi)."""
        side = self.scales[-1]
        if si != self.num_scales - 1:
            codes = F.interpolate(codes, size=(side, side), mode="bicubic")
        return self.quant_resi.for_scale(si, self.num_scales)(codes)

    def embed_scale(self, si: int, indices: Tensor) -> Tensor:
        """Un-normalised codes of one scale: indices (B, p * p) (``-1``: zero) -> (B, C, p, p)."""
        p = self.scales[si]
        codes = embed_or_zero(indices, self.embedding.weight)
        return codes.view(indices.shape[0], p, p, self.dim).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, C, H, W) -> quantized (B, C, H, W), indices (B, L) int64."""
        B, C, H, W = z.shape
        if C != self.dim or H != W or H != self.scales[-1]:
            raise ValueError(
                f"expected (B, {self.dim}, {self.scales[-1]}, {self.scales[-1]}), got {tuple(z.shape)}"
            )
        f = z.float()
        f_detached = f.detach()
        rest = f_detached.clone()
        f_hat = torch.zeros_like(f)
        n_keep = self._scales_kept(B, z.device)
        codebook_loss = f.new_zeros(())
        commitment = f.new_zeros(())
        all_indices: list[Tensor] = []
        usage: dict[str, Tensor] = {}
        for si, p in enumerate(self.scales):
            small = rest if p == H else F.interpolate(rest, size=(p, p), mode="area")
            idx = self.assign(small)
            h = self.scale_contribution(si, self.embed_scale(si, idx))
            keep = si < n_keep  # (B,) bool
            f_hat = f_hat + h * keep.view(B, 1, 1, 1)
            rest = rest - h.detach()
            idx = torch.where(keep.view(B, 1), idx, torch.full_like(idx, -1))
            all_indices.append(idx)
            counts = hit_counts(idx, self.codebook_size)
            usage[f"scale{si}"] = counts
            if self.training:
                self._record_hits(si, counts)
            ratio = keep.float().mean().clamp_min(1.0 / B)
            weight = keep.float().view(B, 1, 1, 1)
            codebook_loss = codebook_loss + ((f_hat - f_detached).square() * weight).mean() / ratio
            commitment = commitment + ((f_hat.detach() - f).square() * weight).mean() / ratio
        if self.training:
            self.record_hit += 1
        return QuantizerOutput(
            quantized=straight_through(z, f_hat.to(z.dtype)),
            indices=torch.cat(all_indices, dim=1),
            losses={
                "codebook": codebook_loss / self.num_scales,
                "commitment": self.beta * commitment / self.num_scales,
            },
            usage=usage,
        )

    def _scales_kept(self, batch: int, device: torch.device) -> Tensor:
        """(B,) int64: how many leading scales each sample keeps this call."""
        full = torch.full((batch,), self.num_scales, dtype=torch.long, device=device)
        if not (self.training and self.dropout_prob > 0):
            return full
        drop = torch.rand(batch, device=device) < self.dropout_prob
        n = torch.randint(self.dropout_start, self.num_scales + 1, (batch,), device=device)
        return torch.where(drop, n, full)

    @torch.no_grad()
    def _record_hits(self, si: int, counts: Tensor) -> None:
        """The published EMA of hit counts: copy at first, then decay 0.9 for 100 steps, then 0.99."""
        row = self.ema_vocab_hit_SV[si]
        if self.record_hit == 0:
            row.copy_(counts)
        elif self.record_hit < 100:
            row.mul_(0.9).add_(counts, alpha=0.1)
        else:
            row.mul_(0.99).add_(counts, alpha=0.01)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (B, L) int64 (a scale whose indices are all ``-1`` for a sample adds nothing) -> (B, C, H, W)."""
        parts = self.split_indices(indices)
        side = self.scales[-1]
        f_hat = self.embedding.weight.new_zeros(indices.shape[0], self.dim, side, side)
        for si, idx in enumerate(parts):
            keep = (idx >= 0).any(dim=1).view(-1, 1, 1, 1).to(f_hat.dtype)
            f_hat = f_hat + self.scale_contribution(si, self.embed_scale(si, idx)) * keep
        return f_hat

    # ---- helpers for next-scale prediction (VAR) ----

    def next_scale_input(self, si: int, f_hat: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Add scale ``si``'s codes (B, C, p_si, p_si) to f_hat (B, C, H, W); return the new f_hat and the
        next scale's input, f_hat area-downsampled to (B, C, p_{si+1}, p_{si+1}) (f_hat itself at the last)."""
        f_hat = f_hat + self.scale_contribution(si, codes)
        if si == self.num_scales - 1:
            return f_hat, f_hat
        p = self.scales[si + 1]
        return f_hat, F.interpolate(f_hat, size=(p, p), mode="area")

    def teacher_forcing_input(self, indices: Tensor) -> Tensor:
        """VAR training input from ground-truth indices (B, L): the inputs of scales 1..S-1 as tokens
        (B, L - p_0 * p_0, C), each scale's token map being f_hat so far area-downsampled to its side."""
        parts = self.split_indices(indices)
        side = self.scales[-1]
        f_hat = self.embedding.weight.new_zeros(indices.shape[0], self.dim, side, side)
        inputs = []
        for si in range(self.num_scales - 1):
            f_hat, nxt = self.next_scale_input(si, f_hat, self.embed_scale(si, parts[si]))
            inputs.append(nxt.flatten(2).transpose(1, 2))
        if not inputs:
            return f_hat.new_zeros(indices.shape[0], 0, self.dim)
        return torch.cat(inputs, dim=1)
