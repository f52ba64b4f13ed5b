"""KL-16: the continuous VAE that MAR's published generators were trained on (LTH14/mar ``models/vae.py``).

An LDM-style convolutional autoencoder (``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))``): a 256-px
image becomes a 16x16x16 latent. Module and parameter names follow the published ``kl16.ckpt`` state dict
(``encoder.down.{i}.block.{j}.conv1`` ...), so it loads with :func:`models.hub.load_into` unchanged. Facts:
``../shared/reference/FORMATS-MAR-XQV.md`` section 1.7.

The tokenizer surface matches the other tokenizers: ``encode(images (B, 3, H, W) in [-1, 1]) -> tokens
(B, L, 16)`` with ``L = (H/16) * (W/16)`` in raster order (token ``h * W/16 + w`` holds the 16 channels of
that latent pixel, MAR's patch-1 layout), already multiplied by ``latent_scale`` (0.2325, MAR's scale; no
shift); ``decode(tokens) -> images (B, 3, H, W)`` in about [-1, 1], not clamped. ``encode`` returns the
posterior *mode*; :meth:`KL16.encode_moments` gives mean and log-variance for training-time sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers.attention import attend
from models.registry import register_config, register_model_class
from models.surface import ContinuousTokenizerSurface


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN-swish-conv3x3 twice with a residual; a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (``norm, q, k, v, proj_out``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # each (B, 1, HW, C): one head over the flattened pixels
        q, k, v = (m(n).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        a = attend(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(a.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Pad right/bottom by one, then a 3x3 stride-2 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (optional AttnBlocks after each block) and a
    ``downsample`` / ``upsample`` (absent at the last level)."""

    def __init__(self, cin: int, cout: int, n_blocks: int, attn: bool, resample: nn.Module | None,
                 dropout: float, resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cout if i else cin, cout, dropout) for i in range(n_blocks))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(n_blocks)) if attn else nn.ModuleList()
        if resample is not None:
            self.add_module(resample_name, resample)
        self._resample = resample_name if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self._resample)(x) if self._resample else x


class Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


@dataclass(frozen=True)
class KL16Config:
    """The published MAR VAE by default. ``encoder_attn_resolutions`` / ``decoder_attn_resolutions`` are
    feature-map sizes (in pixels of that level) with attention blocks; the published decoder has none
    outside ``mid`` (MAR issue #3). ``latent_scale`` multiplies the posterior mode in :meth:`KL16.encode`
    (1 / std of ImageNet latents, MAR issue #2); ``vq_mean`` / ``vq_std`` are the generator-side
    normalisation applied on top, as for SoftVQ: none here (0, 1), since the scale already gives unit std."""

    image_size: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    embed_dim: int = 16
    encoder_attn_resolutions: tuple[int, ...] = (16,)
    decoder_attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    latent_scale: float = 0.2325
    vq_mean: float = 0.0
    vq_std: float = 1.0
    license: str = "MIT (LTH14/mar)"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.downsample) ** 2

    @property
    def token_dim(self) -> int:
        return self.embed_dim


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2 * z_channels, H / 2^(levels-1), W / 2^(levels-1)): posterior moments before
    ``quant_conv``."""

    def __init__(self, cfg: KL16Config) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        res, cin = cfg.image_size, cfg.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            cout = cfg.ch * mult
            last = i == len(cfg.ch_mult) - 1
            self.down.append(Level(cin, cout, cfg.num_res_blocks, res in cfg.encoder_attn_resolutions,
                                   None if last else Downsample(cout), cfg.dropout, "downsample"))
            cin, res = cout, res if last else res // 2
        self.mid = Mid(cin, cfg.dropout)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h * 2^(levels-1), w * 2^(levels-1)). ``up[0]`` is the full-resolution
    level; the levels run from ``up[-1]`` (lowest resolution) to ``up[0]``."""

    def __init__(self, cfg: KL16Config) -> None:
        super().__init__()
        cin = cfg.ch * cfg.ch_mult[-1]
        res = cfg.image_size // cfg.downsample
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = Mid(cin, cfg.dropout)
        levels: list[Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            cout = cfg.ch * cfg.ch_mult[i]
            levels.insert(0, Level(cin, cout, cfg.num_res_blocks + 1, res in cfg.decoder_attn_resolutions,
                                   Upsample(cout) if i != 0 else None, cfg.dropout, "upsample"))
            cin, res = cout, res * 2 if i != 0 else res
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@register_model_class
class KL16(ContinuousTokenizerSurface, nn.Module):
    """MAR's KL-16 VAE as a tokenizer: ``encode`` images -> scaled tokens (B, L, 16), ``decode`` back."""

    config_class = KL16Config
    IGNORED_KEYS = ("loss.*",)  # LDM training checkpoints may carry discriminator / LPIPS weights

    def __init__(self, config: KL16Config) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> unscaled posterior (mean, logvar), each (B, embed_dim, h, w); logvar is
        clamped to [-30, 20]. A training-time sample is ``(mean + exp(logvar / 2) * noise) *
        latent_scale``."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode_spatial(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled posterior mode (B, embed_dim, H/16, W/16)."""
        return self.encode_moments(images)[0] * self.config.latent_scale

    def decode_spatial(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, embed_dim, h, w) -> images (B, 3, 16h, 16w) in about [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(latents / self.config.latent_scale))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled tokens (B, (H/16) * (W/16), embed_dim), raster order."""
        return self.encode_spatial(images).flatten(2).transpose(1, 2)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scaled tokens (B, L, embed_dim) with square L (or spatial (B, embed_dim, h, w)) -> images
        (B, 3, H, W) in about [-1, 1]."""
        if tokens.dim() == 3:
            b, n, d = tokens.shape
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"KL16 tokens need a square count, got {n}")
            tokens = tokens.transpose(1, 2).reshape(b, d, side, side)
        return self.decode_spatial(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mode: (B, 3, H, W) -> (B, 3, H, W)."""
        return self.decode_spatial(self.encode_spatial(images))


register_config("kl16", KL16, KL16Config,
                "MAR's KL-16 VAE (LTH14/mar kl16.ckpt): 256 px -> 256 tokens x 16, scale 0.2325, 66.46 M")
