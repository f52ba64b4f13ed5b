"""TAEF2: the tiny autoencoder of the FLUX.2 latent space (madebyollin/taesd, MIT licence).

A real pretrained continuous autoencoder with the same budget as a 64-token x 32-dim tokenizer at 64x64:
8x spatial reduction, 32 channels, so a 64x64 image gives 8x8x32 = 2,048 floats. Written from the layer
description in ``../shared/weights/taef2/README.md``; the original weights are two state dicts whose keys
are ``nn.Sequential`` positions, loaded strictly by :meth:`TAEF2.from_original`.

The tokenizer surface matches the SoftVQ models: ``encode(images (B, 3, H, W) in [-1, 1]) -> tokens
(B, L, 32)`` with ``L = (H/8) * (W/8)`` in raster order, ``decode(tokens) -> images in [-1, 1]``. Internally
TAEF2 works on [0, 1] images; the mapping is done here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from models.latent_norm import LatentNormMixin
from models.registry import register_config, register_model_class
from models.surface import ContinuousTokenizerSurface

DEFAULT_WEIGHTS = Path(os.environ.get("TOKSERVE_TAEF2", "../shared/weights/taef2"))


def conv(a: int, b: int, *, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(a, b, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp to (-3, 3): ``tanh(x / 3) * 3``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block ``relu(conv(x) + skip(x))``; the FLUX.2 variant (``gn``) first adds a pooled 1x1
    bottleneck branch ``x = x + pool(x)``."""

    def __init__(self, a: int, b: int, gn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv(a, b), nn.ReLU(), conv(b, b), nn.ReLU(), conv(b, b))
        self.skip = nn.Conv2d(a, b, 1, bias=False) if a != b else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = (
            nn.Sequential(nn.Conv2d(a, 4 * a, 1, bias=False), nn.GroupNorm(4, 4 * a), nn.ReLU(),
                          nn.Conv2d(4 * a, a, 1, bias=False))
            if gn else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def build_encoder(c: int = 64, latent: int = 32) -> nn.Sequential:
    """(B, 3, H, W) in [0, 1] -> (B, latent, H/8, W/8) raw latents."""
    return nn.Sequential(
        conv(3, c), Block(c, c),
        conv(c, c, stride=2, bias=False), Block(c, c), Block(c, c), Block(c, c),
        conv(c, c, stride=2, bias=False), Block(c, c), Block(c, c), Block(c, c),
        conv(c, c, stride=2, bias=False), Block(c, c, True), Block(c, c, True), Block(c, c, True),
        conv(c, latent),
    )


def build_decoder(c: int = 64, latent: int = 32) -> nn.Sequential:
    """(B, latent, h, w) raw latents -> (B, 3, 8h, 8w), unclamped (clamp to [0, 1] after)."""
    return nn.Sequential(
        Clamp(), conv(latent, c), nn.ReLU(),
        Block(c, c, True), Block(c, c, True), Block(c, c, True),
        nn.Upsample(scale_factor=2), conv(c, c, bias=False), Block(c, c), Block(c, c), Block(c, c),
        nn.Upsample(scale_factor=2), conv(c, c, bias=False), Block(c, c), Block(c, c), Block(c, c),
        nn.Upsample(scale_factor=2), conv(c, c, bias=False), Block(c, c),
        conv(c, 3),
    )


@dataclass(frozen=True)
class TAEF2Config:
    """``image_size`` is the resolution it is served and evaluated at (any multiple of 8 works)."""

    image_size: int = 64
    channels: int = 64
    latent_channels: int = 32
    downsample: int = 8
    license: str = "MIT (madebyollin/taesd)"
    # Latent statistics for generators trained on TAEF2 tokens ((z - vq_mean) / vq_std); identity until
    # measured (``python -m training generator`` measures and writes them).
    vq_mean: float = 0.0
    vq_std: float = 1.0

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.downsample) ** 2

    @property
    def token_dim(self) -> int:
        return self.latent_channels


@register_model_class
class TAEF2(ContinuousTokenizerSurface, LatentNormMixin, nn.Module):
    config_class = TAEF2Config

    def __init__(self, config: TAEF2Config) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config.channels, config.latent_channels)
        self.decoder = build_decoder(config.channels, config.latent_channels)

    @classmethod
    def from_original(cls, folder: str | os.PathLike[str] = DEFAULT_WEIGHTS, config: TAEF2Config | None = None) -> TAEF2:
        """Load ``taef2_encoder.pth`` / ``taef2_decoder.pth`` (tensors only, strict key match)."""
        model = cls(config or TAEF2Config())
        folder = Path(folder)
        for part in ("encoder", "decoder"):
            sd = torch.load(folder / f"taef2_{part}.pth", map_location="cpu", weights_only=True)
            getattr(model, part).load_state_dict(sd, strict=True)
        return model.eval()

    def encode_spatial(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> raw latents (B, 32, H/8, W/8)."""
        return self.encoder(images.mul(0.5).add(0.5))

    def decode_spatial(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 32, h, w) -> images (B, 3, 8h, 8w) in [-1, 1]."""
        return self.decoder(latents).clamp(0, 1).mul(2).sub(1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> tokens (B, H/8 * W/8, 32), raster order."""
        return self.encode_spatial(images).flatten(2).transpose(1, 2)

    def tokens_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, 32, h, w) (e.g. a feature cache's) -> tokens (B, h*w, 32), as ``encode`` gives."""
        return latents.flatten(2).transpose(1, 2)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, 32) with square L (or spatial (B, 32, h, w)) -> images (B, 3, H, W) in [-1, 1]."""
        if tokens.dim() == 3:
            b, n, d = tokens.shape
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"TAEF2 tokens need a square count, got {n}")
            tokens = tokens.transpose(1, 2).reshape(b, d, side, side)
        return self.decode_spatial(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, 3, H, W) in [-1, 1]."""
        return self.decode_spatial(self.encode_spatial(images))


register_config("taef2", TAEF2, TAEF2Config,
                "TAEF2 (FLUX.2 tiny autoencoder), 8x8x32 latents at 64x64; weights: TAEF2.from_original()")
