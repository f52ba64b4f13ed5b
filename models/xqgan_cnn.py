"""XQ-GAN's CNN ("V") pipeline: a VQGAN / LlamaGen convolutional autoencoder whose latent map is chunked along
channels into P groups, each quantized by any quantizer of the family, and concatenated again for the decoder.

    images (B, 3, H, W) in [-1, 1]
      -> encoder: conv_in, levels of residual blocks (downsampling between levels, attention at the lowest
         resolution), mid [res, attn, res], GroupNorm, swish, conv_out                   (B, z, h, w)
      -> quant_conv (1x1 conv z -> d)                                                      (B, d, h, w)
      -> quantize: P channel groups of d / P, each a quantizer (VQ | LFQ | BSQ | MSRQ), optionally a residual
         stack of Q levels of it; the groups' codes are concatenated back                  (B, d, h, w)
      -> post_quant_conv (1x1 conv d -> z) -> decoder (mirror, 1 more res block per level)   (B, 3, H, W)

Codes (:meth:`XQGANCNN.encode`) are int64 ``(B, L, Q, G)``: position, residual level, channel group.
For per-vector quantizers (VQ, LFQ, BSQ) the L positions are the ``h x w`` latent grid in row-major order;
for the multi-scale residual quantizer they are its scales concatenated coarse to fine, each row-major
(``L = sum(p * p)``). ``-1`` marks a level dropped by quantizer dropout. :attr:`XQGANCNN.code_structure`
says the same thing as data, for ``/v1/models``. The serving surface is the SC pipeline's
(``models/imagefolder.py``) and every tokenizer's (:mod:`models.surface`): ``encode`` -> codes, ``decode``
codes -> images clamped to [-1, 1]; inside, ``codes_to_fhat``, ``decode_fhat(f_hat)`` (clamped) and
``decode_unclamped(f_hat)`` (training).

With one group and one level the quantizer is the bare module at ``quantize``, so the state-dict keys are
exactly those of LlamaGen VQ-16 (FORMATS-MAR-XQV.md 2.2): ``encoder.conv_blocks.{i}.{res,attn,downsample}``,
``encoder.mid.{0,1,2}``, ``decoder.conv_blocks.{i}.{res,attn,upsample}`` (``decoder.conv_blocks.0`` is the
lowest resolution), ``quant_conv``, ``quantize.embedding.weight``, ``post_quant_conv``. The usage buffers of
the published files (LlamaGen ``quantize.codebook_used``, XQ-GAN ``quantize.ema_vocab_hit_SV``) carry nothing
for inference and are ignored when loading.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.layers.attention import attend
from models.quantizers.base import Quantizer, QuantizerOutput
from models.quantizers.bsq import BinarySphericalQuantizer
from models.quantizers.lfq import LookupFreeQuantizer
from models.quantizers.msrq import MultiScaleResidualQuantizer
from models.quantizers.product import ProductQuantizer
from models.quantizers.residual import ResidualQuantizer
from models.quantizers.vq import VectorQuantizer
from models.registry import register_config, register_model_class
from models.surface import CodeStructure, DiscreteTokenizerSurface

QUANTIZERS: tuple[str, ...] = ("vq", "lfq", "bsq", "msrq")
_BINARY = ("lfq", "bsq")

# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class XQGANCNNConfig:
    """Architecture of a CNN (V-pipeline) tokenizer; all fields JSON-serialisable.

    Backbone: ``base_channels`` x ``channel_mult`` per level (one downsampling between consecutive levels,
    so the latent side is ``image_size / 2 ** (len(channel_mult) - 1)``), ``enc_res_blocks`` residual blocks
    per encoder level and ``dec_res_blocks`` per decoder level (LlamaGen: 2 and 3), ``z_channels`` at the
    bottleneck, GroupNorm with ``norm_groups`` groups (eps 1e-6) and swish.

    Quantizer: ``codebook_dim`` (d) channels after ``quant_conv``, split into ``num_groups`` (P) groups of
    d / P channels; each group is ``quantizer`` (``vq`` | ``lfq`` | ``bsq`` | ``msrq``), or a residual
    stack of ``num_levels`` (Q) of them. ``codebook_size`` is V for ``vq`` / ``msrq``; for ``lfq`` / ``bsq``
    V is ``2 ** (d / P)`` and the field must be 0 or equal to it. ``cosine``: l2-normalised matching
    (``vq`` / ``msrq``). ``beta``: commitment weight. ``entropy_weight`` / ``entropy_mode``: LFQ / BSQ entropy
    loss. ``level_scale``: the code magnitude of residual level l is ``level_scale ** l`` (LFQ: each level
    resolves a finer residual). ``msrq_scales``: the MSRQ scales, coarse to fine, ending at the latent side
    (empty: ``1 .. side``). ``quantizer_dropout``: probability of the residual stack's level dropout.
    """

    image_size: int = 256
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    enc_res_blocks: int = 2
    dec_res_blocks: int = 3
    z_channels: int = 256
    norm_groups: int = 32
    dropout: float = 0.0
    quantizer: str = "vq"
    codebook_size: int = 16384
    codebook_dim: int = 8
    num_groups: int = 1
    num_levels: int = 1
    cosine: bool = True
    beta: float = 0.25
    entropy_weight: float = 0.1
    entropy_mode: str = "exact"
    level_scale: float = 0.5
    msrq_scales: tuple[int, ...] = ()
    quantizer_dropout: float = 0.0
    trained_on: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        problems = []
        down = 2 ** (len(self.channel_mult) - 1)
        if not self.channel_mult:
            problems.append("channel_mult must not be empty")
        elif self.image_size % down:
            problems.append(f"image_size {self.image_size} not a multiple of the downsampling factor {down}")
        widths = {self.base_channels * m for m in self.channel_mult}
        if any(w % self.norm_groups for w in widths):
            problems.append(
                f"channel widths {sorted(widths)} must be multiples of norm_groups {self.norm_groups}"
            )
        if self.quantizer not in QUANTIZERS:
            problems.append(f"quantizer {self.quantizer!r} not in {QUANTIZERS}")
        if self.num_groups < 1 or self.num_levels < 1:
            problems.append("num_groups and num_levels must be >= 1")
        elif self.codebook_dim % self.num_groups:
            problems.append(f"codebook_dim {self.codebook_dim} not divisible by num_groups {self.num_groups}")
        elif self.quantizer in _BINARY:
            bits = self.codebook_dim // self.num_groups
            if not 1 <= bits <= 62:
                problems.append(f"{self.quantizer}: {bits} bits per group; need 1..62")
            elif self.codebook_size not in (0, 2**bits):
                problems.append(f"{self.quantizer}: codebook_size must be 0 or 2**{bits} = {2**bits}")
            if self.entropy_mode not in ("exact", "factorized"):
                problems.append(f"entropy_mode {self.entropy_mode!r} not in ('exact', 'factorized')")
            elif self.entropy_mode == "exact" and bits > 16 and self.entropy_weight > 0:
                problems.append(f"exact LFQ entropy over 2**{bits} codes; use entropy_mode 'factorized'")
        elif self.codebook_size < 2:
            problems.append(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.quantizer == "msrq" and self.msrq_scales:
            side = self.image_size // down if self.channel_mult else 0
            if self.msrq_scales[-1] != side or any(p < 1 or p > side for p in self.msrq_scales):
                problems.append(f"msrq_scales {self.msrq_scales} must lie in [1, {side}] and end at {side}")
        if not 0.0 <= self.quantizer_dropout <= 1.0:
            problems.append("quantizer_dropout must be in [0, 1]")
        if problems:
            raise ValueError("invalid XQGANCNNConfig: " + "; ".join(problems))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_side(self) -> int:
        """h = w of the latent map."""
        return self.image_size // self.downsample

    @property
    def group_dim(self) -> int:
        return self.codebook_dim // self.num_groups

    @property
    def scales(self) -> tuple[int, ...]:
        """The MSRQ scales (``msrq`` only)."""
        return self.msrq_scales or tuple(range(1, self.latent_side + 1))

    @property
    def vocab_size(self) -> int:
        """Values one code can take (the same for every group and level)."""
        return 2**self.group_dim if self.quantizer in _BINARY else self.codebook_size

    @property
    def num_positions(self) -> int:
        """L: latent positions (``h * w``) or, for ``msrq``, ``sum(p * p)`` over the scales."""
        if self.quantizer == "msrq":
            return sum(p * p for p in self.scales)
        return self.latent_side**2


def build_quantizer(cfg: XQGANCNNConfig) -> Quantizer:
    """The quantizer of ``cfg``: the bare base quantizer for P = Q = 1, else a product of residual stacks."""

    def base(level: int) -> Quantizer:
        d = cfg.group_dim
        if cfg.quantizer == "vq":
            return VectorQuantizer(cfg.codebook_size, d, cosine=cfg.cosine, beta=cfg.beta)
        if cfg.quantizer == "lfq":
            return LookupFreeQuantizer(
                d,
                code_scale=cfg.level_scale**level,
                beta=cfg.beta,
                entropy_weight=cfg.entropy_weight,
                entropy_mode=cfg.entropy_mode,
            )  # type: ignore[arg-type]
        if cfg.quantizer == "bsq":
            return BinarySphericalQuantizer(
                d, beta=cfg.beta, entropy_weight=cfg.entropy_weight, entropy_mode=cfg.entropy_mode
            )  # type: ignore[arg-type]
        return MultiScaleResidualQuantizer(cfg.codebook_size, d, cfg.scales, cosine=cfg.cosine, beta=cfg.beta)

    def group() -> Quantizer:
        if cfg.num_levels == 1:
            return base(0)
        return ResidualQuantizer.build(cfg.num_levels, base, dropout_prob=cfg.quantizer_dropout)

    if cfg.num_groups == 1:
        return group()
    return ProductQuantizer(
        [group() for _ in range(cfg.num_groups)], channel_dim=1 if cfg.quantizer == "msrq" else -1
    )


# --------------------------------------------------------------------------------------------- layers


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv3x3 twice, with a 1x1 ``nin_shortcut`` when the width changes: (B, Ci, H, W) ->
    (B, Co, H, W)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1-conv projections: (B, C, H, W) -> same."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (
            t(n).reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q, self.k, self.v)
        )  # (B,1,HW,C)
        out = attend(q, k, v)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1), then a 3x3 stride-2 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``res`` blocks, ``attn`` blocks (lowest resolution only), optional resampler."""

    def __init__(self, in_ch: int, out_ch: int, n_res: int, attn: bool, groups: int, dropout: float) -> None:
        super().__init__()
        self.res = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, dropout) for i in range(n_res)
        )
        self.attn = nn.ModuleList(AttnBlock(out_ch, groups) for _ in range(n_res if attn else 0))

    def blocks(self, h: Tensor) -> Tensor:
        for i, res in enumerate(self.res):
            h = res(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


def _mid(channels: int, groups: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList(
        [
            ResnetBlock(channels, channels, groups, dropout),
            AttnBlock(channels, groups),
            ResnetBlock(channels, channels, groups, dropout),
        ]
    )


class CNNEncoder(nn.Module):
    """Images (B, 3, H, W) -> features (B, z_channels, H / f, W / f), f = 2 ** (levels - 1)."""

    def __init__(self, cfg: XQGANCNNConfig) -> None:
        super().__init__()
        ch, mult, g = cfg.base_channels, cfg.channel_mult, cfg.norm_groups
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        last = len(mult) - 1
        for i, m in enumerate(mult):
            level = _Level(block_in, ch * m, cfg.enc_res_blocks, i == last, g, cfg.dropout)
            block_in = ch * m
            if i != last:
                level.downsample = Downsample(block_in)
            self.conv_blocks.append(level)
        self.mid = _mid(block_in, g, cfg.dropout)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level.blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class CNNDecoder(nn.Module):
    """Features (B, z_channels, h, w) -> images (B, 3, h * f, w * f); ``conv_blocks.0`` is the lowest
    resolution."""

    def __init__(self, cfg: XQGANCNNConfig) -> None:
        super().__init__()
        ch, mult, g = cfg.base_channels, cfg.channel_mult, cfg.norm_groups
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = _mid(block_in, g, cfg.dropout)
        self.conv_blocks = nn.ModuleList()
        last = len(mult) - 1
        for i in reversed(range(len(mult))):
            level = _Level(block_in, ch * mult[i], cfg.dec_res_blocks, i == last, g, cfg.dropout)
            block_in = ch * mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            self.conv_blocks.append(level)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level.blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------- model


@dataclass
class XQGANEncoding:
    """Training-time encoder outputs: ``features`` (B, d, h, w), the ``quant_conv`` output before
    quantization; ``quantized`` (B, d, h, w), the straight-through quantized map (differentiable);
    ``codes`` (B, L, Q, G) int64; ``quantizer``, the full :class:`QuantizerOutput` (losses already
    weighted, usage counts). The same fields as the SC pipeline's ``ImageFolderEncoding``."""

    features: Tensor
    quantized: Tensor
    codes: Tensor
    quantizer: QuantizerOutput


@dataclass
class XQGANOutput:
    """``forward``: reconstruction (B, 3, H, W) unclamped, quantized (B, d, h, w), codes (B, L, Q, G) and
    the quantizer output."""

    reconstruction: Tensor
    quantized: Tensor
    codes: Tensor
    quantizer: QuantizerOutput


@register_model_class
class XQGANCNN(DiscreteTokenizerSurface, nn.Module):
    """XQ-GAN V-pipeline tokenizer (module docstring). ``encode`` (B, 3, H, W) in [-1, 1] -> codes
    (B, L, Q, G) int64; ``decode`` codes -> images in [-1, 1]; ``decode_fhat`` / ``decode_unclamped`` go
    through the quantized map (B, d, h, w) (the same surface as the SC pipeline's ``ImageFolderModel``)."""

    config_class = XQGANCNNConfig
    # Usage statistics and training-only modules of the LlamaGen / XQ-GAN files (FORMATS-MAR-XQV.md 2.2, 3).
    IGNORED_KEYS = (
        "quantize.codebook_used",
        "*.codebook_used",
        "*.ema_vocab_hit_SV",
        "semantic_model.*",
        "detail_model.*",
        "discriminator.*",
        "disc.*",
        "perceptual_loss.*",
        "lpips.*",
    )
    # Our MSRQ keeps its usage history as a persistent buffer; a file without it is still complete.
    OPTIONAL_KEYS = ("*.ema_vocab_hit_SV",)

    def __init__(self, config: XQGANCNNConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = CNNEncoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.quantize = build_quantizer(config)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)
        self.decoder = CNNDecoder(config)

    # ------------------------------------------------------------------------------------------ description

    @property
    def spatial(self) -> bool:
        """Whether the quantizer works on (B, d, h, w) maps (MSRQ) rather than per vector."""
        return self.config.quantizer == "msrq"

    @property
    def fhat_shape(self) -> tuple[int, int, int]:
        """(d, h, w) of one image's quantized map."""
        s = self.config.latent_side
        return (self.config.codebook_dim, s, s)

    @classmethod
    def code_structure_for(cls, config: XQGANCNNConfig) -> CodeStructure:
        """One image's codes (L, Q, G): position, residual level (summed), channel group (concatenated).
        Positions are the MSRQ scales coarse to fine, each row-major, or the row-major latent grid; ``-1``
        marks a dropped level."""
        c = config
        s = c.latent_side
        spatial = c.quantizer == "msrq"
        return CodeStructure(
            axes=("position", "level", "group"), shape=(c.num_positions, c.num_levels, c.num_groups),
            codebook_size=c.vocab_size, code_dim=c.group_dim,
            layout=("scales coarse to fine, each p*p row-major" if spatial else "row-major grid")
            + f"; {c.num_levels} residual levels summed; {c.num_groups} channel groups of {c.group_dim} concatenated",
            scales=tuple(int(p) for p in c.scales) if spatial else (), grid=None if spatial else (s, s),
            latent_shape=(c.codebook_dim, s, s), quantizer=c.quantizer, droppable=True,
        )

    @property
    def last_layer(self) -> Tensor:
        """The decoder's last weight, for the adaptive GAN weight."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------------------------------ codes

    def _raw_index_shape(self, batch: int) -> tuple[int, ...]:
        c = self.config
        grid = (c.num_positions,) if self.spatial else (c.latent_side, c.latent_side)
        return (
            (batch, *grid)
            + ((c.num_levels,) if c.num_levels > 1 else ())
            + ((c.num_groups,) if c.num_groups > 1 else ())
        )

    def _check_images(self, images: Tensor) -> None:
        s = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images (B, 3, {s}, {s}), got {tuple(images.shape)}")

    def quantize_features(self, features: Tensor) -> tuple[Tensor, Tensor, QuantizerOutput]:
        """features (B, d, h, w) -> (quantized (B, d, h, w), codes (B, L, Q, G), quantizer output)."""
        if self.spatial:
            q = self.quantize(features)
            quantized = q.quantized
        else:
            q = self.quantize(features.permute(0, 2, 3, 1))
            quantized = q.quantized.permute(0, 3, 1, 2)
        codes = q.indices.reshape(features.shape[0], *self.code_shape)
        return quantized, codes, q

    def codes_to_fhat(self, codes: Tensor) -> Tensor:
        """codes (B, L, Q, G) int64 -> the quantized map (B, d, h, w) that the encoder produced."""
        if codes.dim() != 4 or tuple(codes.shape[1:]) != self.code_shape:
            raise ValueError(
                f"expected codes (B, {', '.join(map(str, self.code_shape))}), got {tuple(codes.shape)}"
            )
        if bool(((codes < -1) | (codes >= self.config.vocab_size)).any()):
            raise ValueError(f"codes must lie in [0, {self.config.vocab_size}) (or -1 for dropped)")
        raw = codes.long().reshape(self._raw_index_shape(codes.shape[0]))
        z = self.quantize.indices_to_codes(raw).to(self.post_quant_conv.weight.dtype)
        return z if self.spatial else z.permute(0, 3, 1, 2)

    # ------------------------------------------------------------------------------------------ compute

    def features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> pre-quantization features (B, d, h, w)."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images))

    def encode_full(self, images: Tensor) -> XQGANEncoding:
        """images (B, 3, H, W) in [-1, 1] -> features, quantized map, codes, quantizer output."""
        features = self.features(images)
        quantized, codes, q = self.quantize_features(features)
        return XQGANEncoding(features=features, quantized=quantized, codes=codes, quantizer=q)

    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, L, Q, G) int64 (layout: :attr:`code_structure`)."""
        return self.encode_full(images).codes

    def decode_unclamped(self, f_hat: Tensor) -> Tensor:
        """A quantized map (B, d, h, w) -> images (B, 3, H, W), not clamped (the training reconstruction)."""
        if f_hat.dim() != 4 or tuple(f_hat.shape[1:]) != self.fhat_shape:
            raise ValueError(
                f"expected a map (B, {', '.join(map(str, self.fhat_shape))}), got {tuple(f_hat.shape)}"
            )
        return self.decoder(self.post_quant_conv(f_hat))

    def decode_fhat(self, f_hat: Tensor) -> Tensor:
        """A quantized map (B, d, h, w) -> images (B, 3, H, W) clamped to [-1, 1] (as XQ-GAN's
        ``img_to_reconstructed_img``)."""
        return self.decode_unclamped(f_hat).clamp(-1.0, 1.0)

    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, L, Q, G) int64 -> images (B, 3, H, W) in [-1, 1]."""
        return self.decode_fhat(self.codes_to_fhat(codes))

    def forward(self, images: Tensor) -> XQGANOutput:
        """images (B, 3, H, W) -> unclamped reconstruction, quantized map, codes and quantizer output."""
        enc = self.encode_full(images)
        return XQGANOutput(
            reconstruction=self.decode_unclamped(enc.quantized),
            quantized=enc.quantized,
            codes=enc.codes,
            quantizer=enc.quantizer,
        )


# --------------------------------------------------------------------------------------------- named configs

NAMED: dict[str, tuple[XQGANCNNConfig, str]] = {
    "llamagen-vq16": (
        XQGANCNNConfig(
            trained_on="ImageNet-1k", notes="LlamaGen VQ-16 layout (vq_ds16_c2i.pt); the XQ-GAN CNN"
        ),
        "256px, f16 (16x16 codes), ch 128 x (1,1,2,2,4), one cosine VQ of 16384 x 8: LlamaGen VQ-16's layout",
    ),
    "xqgan-v-tiny-64": (
        XQGANCNNConfig(
            image_size=64,
            base_channels=32,
            channel_mult=(1, 2, 2),
            enc_res_blocks=1,
            dec_res_blocks=1,
            z_channels=32,
            norm_groups=8,
            quantizer="lfq",
            codebook_size=0,
            codebook_dim=8,
            num_groups=2,
            num_levels=2,
            notes="for fast tests",
        ),
        "64px, f4 (16x16 positions), ch 32 x (1,2,2); product of 2 residual LFQ (2 levels x 4 bits): tests",
    ),
    "xqgan-v-s-64": (
        XQGANCNNConfig(
            image_size=64,
            base_channels=64,
            channel_mult=(1, 2, 2, 4),
            enc_res_blocks=2,
            dec_res_blocks=2,
            z_channels=64,
            norm_groups=32,
            quantizer="lfq",
            codebook_size=0,
            codebook_dim=20,
            num_groups=2,
            num_levels=2,
            notes="CPU training size",
        ),
        "64px, f8 (8x8 = 64 positions), ch 64 x (1,2,2,4); product of 2 residual LFQ (2 levels x 10 bits)",
    ),
}


def _register() -> None:
    for name, (cfg, desc) in NAMED.items():
        register_config(name, XQGANCNN, lambda cfg=cfg: dataclasses.replace(cfg), desc)


_register()

__all__ = [
    "QUANTIZERS",
    "AttnBlock",
    "CNNDecoder",
    "CNNEncoder",
    "Downsample",
    "ResnetBlock",
    "Upsample",
    "XQGANCNN",
    "XQGANCNNConfig",
    "XQGANEncoding",
    "XQGANOutput",
    "build_quantizer",
]
