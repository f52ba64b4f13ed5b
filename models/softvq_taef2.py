"""SoftVQ over a frozen TAEF2: a 1-D continuous tokenizer whose ViTs work in TAEF2's latent space.

    images (B, 3, 64, 64) in [-1, 1]
      -> frozen TAEF2 encoder                                            raw latents (B, 32, 8, 8)
      -> (latent - latent_shift) * latent_scale, one vector per position  grid (B, 64, 32)
      -> encoder ViT over [64 grid positions (linear embedding + 2-D position table), L latent tokens];
         keep the L latent outputs, LayerNorm, linear to D                (B, L, D)
      -> soft vector quantizer (K codebooks, tau; SoftVQ-VAE's)           tokens (B, L, D)
      -> decoder ViT over [64 mask tokens + positions, L tokens linear to the width];
         keep the 64 grid outputs, LayerNorm, linear to 32 channels      grid (B, 64, 32)
      -> / latent_scale + latent_shift -> frozen TAEF2 decoder            images (B, 3, 64, 64) in [-1, 1]

With ``pair_skip`` (the ``-skip`` configs) a linear path runs beside the two ViTs: grid positions 2i, 2i+1
(raster order: two horizontally adjacent cells) -> a linear map added to token i's pre-quantizer features, and
token i -> a linear map added to the decoder's output at those two positions. Each token then has a home
region of the grid (as the token alignment's resampled feature positions already suggest); the ViTs still
see every position and token and model what the linear path misses. In issue #16's A/B it learned the grid
about ten times faster per step (``training.experiments.bottleneck_ab``).

The convolutional stem (TAEF2, MIT, madebyollin/taesd) does the pixel work; the transformer halves turn its
2-D grid into L 1-D tokens and back, the idea CODA applies to discrete codes. Training
(``python -m training softvq-taef2``) regresses the latent grid (cheap: no pixels) from cached TAEF2 latents.

The serving surface is every tokenizer's (:mod:`models.surface`): ``encode(images) -> (B, L, D)``,
``decode(tokens) -> images``, a continuous ``token_spec`` (``token_shape``, ``image_size``) and the latent
normalisation (``vq_mean`` / ``vq_std``) that generators model. A saved folder holds the TAEF2 weights too
(``vae.encoder.*``, ``vae.decoder.*``), so it is self-contained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from models.latent_norm import LatentNormMixin
from models.layers.vit import LN_EPS, Block
from models.quantizers.soft import SoftQuantizerOutput, SoftQuantizerSettings
from models.registry import register_config, register_model_class
from models.softvq import SoftVQEncoding, SoftVQOutput
from models.surface import ContinuousTokenizerSurface
from models.taef2 import TAEF2, TAEF2Config


@dataclass(frozen=True)
class SoftVQTAEF2Config(SoftQuantizerSettings):
    """A SoftVQ tokenizer on the frozen TAEF2 latent grid (all fields JSON-serialisable).

    ``latent_shift`` / ``latent_scale`` map TAEF2's raw latent to the transformer's input,
    ``(z - shift) * scale`` (measured on training images so the grid has unit variance). ``vq_mean`` /
    ``vq_std`` normalise the tokens for a generator, as in :class:`models.softvq.SoftVQConfig`.
    """

    image_size: int = 64
    latent_channels: int = 32  # TAEF2's
    downsample: int = 8  # TAEF2's
    num_tokens: int = 32
    token_dim: int = 32
    width: int = 256
    enc_depth: int = 4
    dec_depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    layer_scale_init: float = 0.1
    # A linear path beside the two ViTs: each run of N/L raster-adjacent grid vectors -> its token (added before
    # the quantizer) and each token -> its grid vectors (added to the decoder's output). Off in published
    # folders before issue #16's pair-skip A/B; keys ``skip_in.*`` / ``skip_out.*`` exist only when on.
    pair_skip: bool = False
    latent_shift: float = 0.0
    latent_scale: float = 1.0
    vq_mean: float = 0.0
    vq_std: float = 1.0
    license: str = "TAEF2 stem: MIT (madebyollin/taesd); transformer: tokserve"
    trained_on: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.image_size % self.downsample:
            problems.append(f"image_size {self.image_size} not a multiple of downsample {self.downsample}")
        problems += self.quantizer_problems(self.num_tokens, self.token_dim)
        if self.width % self.heads:
            problems.append(f"width {self.width} not divisible by heads {self.heads}")
        if self.pair_skip and (self.image_size // self.downsample) ** 2 % self.num_tokens:
            problems.append(f"pair_skip needs the {(self.image_size // self.downsample) ** 2} grid positions to "
                            f"divide into {self.num_tokens} tokens")
        if self.vq_std <= 0 or self.latent_scale <= 0:
            problems.append("vq_std and latent_scale must be > 0")
        if problems:
            raise ValueError("invalid SoftVQTAEF2Config: " + "; ".join(problems))

    @property
    def grid_side(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_positions(self) -> int:
        return self.grid_side**2

    @property
    def positions_per_token(self) -> int:
        """Grid positions per token on the ``pair_skip`` path (2 for 32 tokens over an 8x8 grid)."""
        return self.num_positions // self.num_tokens


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine table (side*side, dim), rows in raster order: half the channels encode the row,
    half the column (the MAE / DiT layout); used to initialise the learned grid position tables."""
    if dim % 4:
        raise ValueError(f"dim {dim} must be a multiple of 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")

    def enc(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([enc(rows), enc(cols)], dim=1).float()


class _Trunk(nn.Module):
    """Pre-norm ViT blocks (LayerScale) and a final LayerNorm over a token sequence (B, S, W)."""

    def __init__(self, cfg: SoftVQTAEF2Config, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, init_values=cfg.layer_scale_init) for _ in range(depth))
        self.norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class LatentGridEncoder(nn.Module):
    """Normalised grid (B, N, C) -> the last L outputs of a ViT over [grid positions, latent tokens] (B, L, W)."""

    def __init__(self, cfg: SoftVQTAEF2Config) -> None:
        super().__init__()
        self.num_tokens = cfg.num_tokens
        self.embed = nn.Linear(cfg.latent_channels, cfg.width)
        self.pos_embed = nn.Parameter(sincos_2d(cfg.grid_side, cfg.width).unsqueeze(0) * 0.02)
        self.latent_tokens = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        trunc_normal_(self.latent_tokens, std=0.02)
        self.trunk = _Trunk(cfg, cfg.enc_depth)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = self.embed(grid) + self.pos_embed
        x = torch.cat([x, self.latent_tokens.expand(x.shape[0], -1, -1)], dim=1)
        return self.trunk(x)[:, -self.num_tokens:]


class LatentGridDecoder(nn.Module):
    """Tokens at the width (B, L, W) -> normalised grid (B, N, C): ViT over [N mask tokens, L tokens]."""

    def __init__(self, cfg: SoftVQTAEF2Config) -> None:
        super().__init__()
        self.num_positions = cfg.num_positions
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(sincos_2d(cfg.grid_side, cfg.width).unsqueeze(0) * 0.02)
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.latent_pos_embed, std=0.02)
        self.trunk = _Trunk(cfg, cfg.dec_depth)
        self.to_latent = nn.Linear(cfg.width, cfg.latent_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mask_token.expand(z.shape[0], self.num_positions, -1) + self.pos_embed
        x = self.trunk(torch.cat([x, z + self.latent_pos_embed], dim=1))
        return self.to_latent(x[:, : self.num_positions])


@register_model_class
class SoftVQTAEF2(ContinuousTokenizerSurface, LatentNormMixin, nn.Module):
    """SoftVQ tokenizer on the frozen TAEF2. ``encode`` images (B, 3, 64, 64) in [-1, 1] -> tokens (B, L, D);
    ``decode`` tokens -> images in [-1, 1] (TAEF2 clamps)."""

    config_class = SoftVQTAEF2Config
    OPTIONAL_KEYS = ("quantize.codebook_used",)

    def __init__(self, config: SoftVQTAEF2Config) -> None:
        super().__init__()
        self.config = config
        self.vae = TAEF2(TAEF2Config(image_size=config.image_size, latent_channels=config.latent_channels,
                                     downsample=config.downsample))
        self.vae.requires_grad_(False)
        self.encoder = LatentGridEncoder(config)
        self.quant_conv = nn.Linear(config.width, config.token_dim)
        self.quantize = config.build_quantizer(config.token_dim)
        self.post_quant_conv = nn.Linear(config.token_dim, config.width)
        self.decoder = LatentGridDecoder(config)
        if config.pair_skip:
            run = config.positions_per_token * config.latent_channels
            self.skip_in = nn.Linear(run, config.token_dim)
            self.skip_out = nn.Linear(config.token_dim, run)

    @classmethod
    def with_taef2(cls, config: SoftVQTAEF2Config, taef2_folder=None) -> SoftVQTAEF2:
        """A fresh model (random transformer) standing on the original pretrained TAEF2 weights."""
        model = cls(config)
        src = TAEF2.from_original(taef2_folder) if taef2_folder is not None else TAEF2.from_original()
        model.vae.load_state_dict(src.state_dict())
        return model

    def train(self, mode: bool = True) -> SoftVQTAEF2:
        super().train(mode)
        self.vae.eval()  # frozen stem: always in eval mode
        return self

    # ------------------------------------------------------------------------------------------ serving

    @property
    def latent_grid_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of TAEF2's raw latent for one image."""
        s = self.config.grid_side
        return (self.config.latent_channels, s, s)

    # ------------------------------------------------------------------------------------------ latent space

    def grid_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw TAEF2 latents (B, C, h, w) -> normalised grid vectors (B, h*w, C), raster order."""
        if latents.dim() != 4 or tuple(latents.shape[1:]) != self.latent_grid_shape:
            raise ValueError(f"expected TAEF2 latents (B, {', '.join(map(str, self.latent_grid_shape))}), "
                             f"got {tuple(latents.shape)}")
        c = self.config
        return ((latents - c.latent_shift) * c.latent_scale).flatten(2).transpose(1, 2)

    def latents_from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """Normalised grid vectors (B, h*w, C) -> raw TAEF2 latents (B, C, h, w)."""
        c = self.config
        b = grid.shape[0]
        s = c.grid_side
        return (grid / c.latent_scale + c.latent_shift).transpose(1, 2).reshape(b, c.latent_channels, s, s)

    def encode_latents(self, latents: torch.Tensor, compute_losses: bool = True) -> SoftVQEncoding:
        """Raw TAEF2 latents (B, C, h, w) -> tokens, pre-quantization features, quantizer output."""
        grid = self.grid_from_latents(latents)
        features = self.quant_conv(self.encoder(grid))
        if self.config.pair_skip:  # (B, N, C) -> (B, L, N/L * C): each token's run of positions
            features = features + self.skip_in(grid.reshape(grid.shape[0], self.config.num_tokens, -1))
        q: SoftQuantizerOutput = self.quantize(features, compute_losses)
        return SoftVQEncoding(tokens=q.quantized, features=features, quantizer=q)

    def tokens_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw TAEF2 latents (B, C, h, w) -> tokens (B, L, D): ``encode`` after the frozen encoder."""
        return self.encode_latents(latents, compute_losses=False).tokens

    def decode_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, D) -> normalised grid (B, h*w, C) (the training target space)."""
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != self.token_shape:
            raise ValueError(f"expected tokens (B, {self.token_shape[0]}, {self.token_shape[1]}), "
                             f"got {tuple(tokens.shape)}")
        grid = self.decoder(self.post_quant_conv(tokens))
        if self.config.pair_skip:
            grid = grid + self.skip_out(tokens).reshape(grid.shape)
        return grid

    def decode_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, D) -> raw TAEF2 latents (B, C, h, w)."""
        return self.latents_from_grid(self.decode_grid(tokens))

    # ------------------------------------------------------------------------------------------ images

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images (B, 3, {s}, {s}), got {tuple(images.shape)}")

    def encode_full(self, images: torch.Tensor, compute_losses: bool = True) -> SoftVQEncoding:
        self._check_images(images)
        return self.encode_latents(self.vae.encode_spatial(images), compute_losses)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> continuous tokens (B, L, D)."""
        return self.encode_full(images, compute_losses=False).tokens

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, D) -> images (B, 3, H, W) in [-1, 1]."""
        return self.vae.decode_spatial(self.decode_latents(tokens))

    def forward(self, images: torch.Tensor) -> SoftVQOutput:
        enc = self.encode_full(images, compute_losses=True)
        return SoftVQOutput(reconstruction=self.decode(enc.tokens), tokens=enc.tokens, quantizer=enc.quantizer)


# --------------------------------------------------------------------------------------------- named configs

NAMED: dict[str, tuple[SoftVQTAEF2Config, str]] = {
    "softvq-taef2-tiny": (
        SoftVQTAEF2Config(num_tokens=32, token_dim=16, width=64, enc_depth=1, dec_depth=1, heads=2,
                          codebook_size=64, notes="for fast tests"),
        "64px, frozen TAEF2 stem, 32x16 tokens, width 64 / depth 1+1 (tests)",
    ),
    "softvq-taef2-32": (
        SoftVQTAEF2Config(num_tokens=32, token_dim=32, width=192, enc_depth=2, dec_depth=3, heads=3),
        "64px, frozen TAEF2 stem, 32x32 tokens (1,024 floats), width 192 / depth 2+3, 4x1024 codes",
    ),
    "softvq-taef2-32x64": (
        SoftVQTAEF2Config(num_tokens=32, token_dim=64, width=192, enc_depth=2, dec_depth=3, heads=3),
        "64px, frozen TAEF2 stem, 32x64 tokens (2,048 floats), width 192 / depth 2+3, 4x1024 codes",
    ),
    "softvq-taef2-32x64-skip": (
        SoftVQTAEF2Config(num_tokens=32, token_dim=64, width=192, enc_depth=2, dec_depth=3, heads=3, pair_skip=True,
                          quantizer="residual", num_levels=2),
        "softvq-taef2-32x64 plus the linear pair path (token i <-> grid positions 2i, 2i+1) beside the ViTs, "
        "2-level residual soft quantizer",
    ),
    "softvq-taef2-32-skip": (
        SoftVQTAEF2Config(num_tokens=32, token_dim=32, width=192, enc_depth=2, dec_depth=3, heads=3, pair_skip=True,
                          quantizer="residual", num_levels=2),
        "softvq-taef2-32 plus the linear pair path (token i <-> grid positions 2i, 2i+1) beside the ViTs, "
        "2-level residual soft quantizer",
    ),
}


def _register() -> None:
    for name, (cfg, desc) in NAMED.items():
        register_config(name, SoftVQTAEF2, lambda cfg=cfg: dataclasses.replace(cfg), desc)


_register()

__all__ = ["LatentGridDecoder", "LatentGridEncoder", "SoftVQTAEF2", "SoftVQTAEF2Config", "sincos_2d"]
