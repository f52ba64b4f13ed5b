"""ImageFolder / XQ-GAN "SC" tokenizer: a ViT with learnable latent tokens per branch, product-quantized by
multi-scale residual quantizers (or plain VQ), decoded by a ViT from mask tokens. Key-compatible with the
published ``qiuk6/XQ-GAN`` / ``ang9867/imagefolder`` checkpoints (``../shared/reference/FORMATS.md`` 2.2-2.4).

    images (B, 3, H, W) in [-1, 1]
      -> encoder: ViT over [cls, N patches, G x s*s latent tokens] + lvl_embed[lvl1LC]; keep the latents
                                                                                    (B, G*s*s, De)
      -> quant_conv (Conv2d 1x1 on (B, De, G*s*s, 1))                              (B, C, G*s*s, 1)
      -> branch g = latent tokens [g*s*s, (g+1)*s*s) as an s x s grid, channels stacked per branch
                                                                                    (B, G*C, s, s)
      -> product of G quantizers (``quantizes.{g}``; ``quantize`` when G == 1)       f_hat (B, G*C, s, s)
      -> post_quant_conv (Conv2d 1x1, G*C -> Dd), flattened to tokens               (B, s*s, Dd)
      -> decoder: ViT over [cls, N mask tokens, cls, s*s latents] + lvl_embed[lvl1LC]; tokens [1, 1+N),
         Linear to pixels, unpatchify, clamp to [-1, 1]                             (B, 3, H, W)

Position embeddings: the image tokens use the ViT's own ``pos_embed``; each branch's latent grid gets that
table resampled to s x s with timm's ``resample_abs_pos_embed`` (bicubic, antialias), recomputed on every
forward as published. ``lvl1LC`` marks [cls + patches] with 0 and branch g with g + 1 (decoder: 0, then 1 for
its cls + latents). The published code sizes the image part as ``patch_size**2 + 1``, right only because
256 / 16 = 16; we use the true ``num_patches + 1`` (the same number for every released config and for the
64 px / patch 8 tiny config).

Codes (:meth:`ImageFolderModel.encode`): int64 (B, G, L), L = sum(p * p for p in scales), each branch's
scales concatenated coarse to fine, each scale row-major (MSVR10P2: (B, 2, 286); VP2: (B, 2, 256)).
:attr:`ImageFolderModel.code_structure` describes this for clients.

Key layout: ``encoder.{latent_tokens, lvl1LC, lvl_embed, model.*}``, ``quant_conv``, ``quantizes.{g}.*`` (or
``quantize.*``), ``post_quant_conv``, ``decoder.{mask_token, lvl1LC, lvl_embed, model.*, to_pixel.model}``;
no ``decoder.model.patch_embed`` (deleted in the published ``__init__``). The frozen ``semantic_model.*``
(DINOv2-B used only by the training loss) and other training-only tensors are ignored on load.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_

from models.layers.vit import ToPixel, VisionTransformer
from models.quantizers.base import Quantizer, QuantizerOutput
from models.quantizers.msrq import IMAGEFOLDER_SCALES, MultiScaleResidualQuantizer
from models.quantizers.product import ProductQuantizer
from models.quantizers.vq import VectorQuantizer
from models.registry import register_config, register_model_class
from models.surface import CodeStructure, DiscreteTokenizerSurface

# timm DINOv2 names of the published configs -> (width, depth, heads); patch re-set to 16, image 256.
OFFICIAL_VITS: dict[str, tuple[int, int, int]] = {
    "vit_small_patch14_dinov2": (384, 12, 6),
    "vit_base_patch14_dinov2": (768, 12, 12),
    "vit_large_patch14_dinov2": (1024, 24, 16),
}


@dataclass(frozen=True)
class ImageFolderConfig:
    """Architecture of an XQ-GAN SC tokenizer (all fields JSON-serialisable).

    ``num_branches`` (G, ``product_quant``) branches of ``latent_side**2`` latent tokens each, where
    ``latent_side = scales[-1]``; each branch is quantized to ``code_dim`` (C, ``codebook_embed_dim``)
    channels with its own codebook of ``codebook_size`` codes. ``scales`` (``v_patch_nums``) with more than
    one entry selects the multi-scale residual quantizer (``quant_resi`` / ``share_quant_resi`` Phi convs,
    ``codebook_drop`` / ``start_drop`` quantizer dropout in training); one entry selects plain VQ.
    ``codebook_l2_norm``: cosine matching.
    """

    image_size: int = 256
    patch_size: int = 16
    enc_width: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_width: int = 768
    dec_depth: int = 12
    dec_heads: int = 12
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-5
    drop_path: float = 0.0
    num_branches: int = 2
    code_dim: int = 32
    codebook_size: int = 4096
    scales: tuple[int, ...] = IMAGEFOLDER_SCALES
    codebook_l2_norm: bool = True
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    beta: float = 0.25
    codebook_drop: float = 0.0
    start_drop: int = 3
    trained_on: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} not a multiple of patch_size {self.patch_size}")
        if self.enc_width % self.enc_heads or self.dec_width % self.dec_heads:
            problems.append("widths must be divisible by their head counts")
        if self.num_branches < 1:
            problems.append("num_branches must be >= 1")
        if not self.scales or any(int(p) < 1 for p in self.scales):
            problems.append(f"scales must be positive, got {self.scales}")
        elif max(self.scales) != self.scales[-1]:
            problems.append(f"the last scale must be the largest (the latent side), got {self.scales}")
        if self.codebook_size < 2 or self.code_dim < 1:
            problems.append("codebook_size must be >= 2 and code_dim >= 1")
        if problems:
            raise ValueError("invalid ImageFolderConfig: " + "; ".join(problems))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def latent_side(self) -> int:
        """s: each branch's latent tokens form an s x s grid."""
        return int(self.scales[-1])

    @property
    def tokens_per_branch(self) -> int:
        """Latent tokens per branch in the encoder / decoder (s * s)."""
        return self.latent_side**2

    @property
    def num_codes(self) -> int:
        """L: codes per branch, sum(p * p) over the scales (286 for MSVR10P2, 256 for VP2)."""
        return sum(int(p) ** 2 for p in self.scales)

    @property
    def multi_scale(self) -> bool:
        return len(self.scales) > 1

    # ------------------------------------------------------------ the published training args (ModelArgs)

    @staticmethod
    def matches_official(d: dict[str, Any]) -> bool:
        """Whether ``d`` looks like XQ-GAN's training args (``vars(args)`` / the YAML config)."""
        return "class_name" not in d and "v_patch_nums" in d and "product_quant" in d

    @classmethod
    def from_official(cls, d: dict[str, Any]) -> ImageFolderConfig:
        """Translate XQ-GAN's args; unsupported variants raise ``ValueError`` naming the field."""
        for key in ("enc_type", "dec_type"):
            if d.get(key, "dinov2") != "dinov2":
                raise ValueError(f"official config: {key}={d[key]!r} is not supported (only 'dinov2' ViTs)")
        if not d.get("abs_pos_embed", False):
            raise ValueError("official config: abs_pos_embed=false (latent_pos_embed tokenizers) is not supported")
        if d.get("lfq", False):
            raise ValueError("official config: lfq=true (MSBR configs) is not supported")
        enc = _official_vit(d.get("encoder_model", ""), "encoder_model")
        dec = _official_vit(d.get("decoder_model", ""), "decoder_model")
        scales = tuple(int(p) for p in d["v_patch_nums"])
        if int(d.get("num_latent_tokens", scales[-1] ** 2)) != scales[-1] ** 2:
            raise ValueError(f"official config: num_latent_tokens {d['num_latent_tokens']} != {scales[-1]}**2")
        return cls(
            image_size=int(d.get("image_size", 256)), patch_size=16,
            enc_width=enc[0], enc_depth=enc[1], enc_heads=enc[2],
            dec_width=dec[0], dec_depth=dec[1], dec_heads=dec[2],
            num_branches=int(d["product_quant"]), code_dim=int(d.get("codebook_embed_dim", 8)),
            codebook_size=int(d.get("codebook_size", 16384)), scales=scales,
            codebook_l2_norm=bool(d.get("codebook_l2_norm", True)),
            share_quant_resi=int(d.get("share_quant_resi", 4)), beta=float(d.get("commit_loss_beta", 0.25)),
            codebook_drop=float(d.get("codebook_drop", 0.0)), start_drop=int(d.get("start_drop", 1)),
            notes=f"from official args: encoder {d.get('encoder_model')}, decoder {d.get('decoder_model')}",
        )


def _official_vit(name: str, field_name: str) -> tuple[int, int, int]:
    base = str(name).split(".")[0]
    if base not in OFFICIAL_VITS:
        raise ValueError(f"official config: {field_name}={name!r} is not supported; known: {sorted(OFFICIAL_VITS)}")
    return OFFICIAL_VITS[base]


def level_layout(prefix: int, segments: list[int]) -> torch.Tensor:
    """The ``lvl1LC`` buffer (1, prefix + sum(segments)) int64: ``prefix`` zeros, then segment i filled with
    i + 1. Encoder: prefix = 1 + N, segments = [s*s] * G; decoder: prefix = 1 + N, segments = [1 + s*s]."""
    parts = [torch.zeros(prefix, dtype=torch.long)]
    parts += [torch.full((n,), i + 1, dtype=torch.long) for i, n in enumerate(segments)]
    return torch.cat(parts).view(1, -1)


def _latent_pos(model: VisionTransformer, side: int) -> torch.Tensor:
    """The ViT's ``pos_embed`` (1, 1 + N, D) resampled to [cls, side x side]: (1, 1 + side*side, D)."""
    return resample_abs_pos_embed(model.pos_embed, [side, side], num_prefix_tokens=1)


# --------------------------------------------------------------------------------------------- modules


class ImageFolderEncoder(nn.Module):
    """Images (B, 3, H, W) -> latent outputs (B, G*s*s, De) of a ViT over [cls, patches, latents]."""

    def __init__(self, cfg: ImageFolderConfig) -> None:
        super().__init__()
        self.num_branches = cfg.num_branches
        self.side = cfg.latent_side
        n = cfg.num_branches * cfg.tokens_per_branch
        self.model = VisionTransformer(
            cfg.image_size, cfg.patch_size, cfg.enc_width, cfg.enc_depth, cfg.enc_heads, cfg.mlp_ratio,
            init_values=cfg.layer_scale_init, drop_path_rate=cfg.drop_path,
        )
        self.latent_tokens = nn.Parameter(torch.zeros(1, n, cfg.enc_width))
        nn.init.normal_(self.latent_tokens, std=1e-6)
        self.lvl_embed = nn.Embedding(1 + cfg.num_branches, cfg.enc_width)
        trunc_normal_(self.lvl_embed.weight, std=math.sqrt(1 / cfg.enc_width / 3))
        layout = level_layout(1 + cfg.num_patches, [cfg.tokens_per_branch] * cfg.num_branches)
        self.register_buffer("lvl1LC", layout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.add_cls_and_pos(self.model.patchify(images))  # (B, 1+N, De)
        pos = _latent_pos(self.model, self.side)[:, 1:]  # (1, s*s, De): the cls slot is dropped
        z = self.latent_tokens.expand(x.shape[0], -1, -1) + pos.repeat(1, self.num_branches, 1)
        x = torch.cat([x, z], dim=1) + self.lvl_embed(self.lvl1LC)
        x = self.model.run(x)
        return x[:, -self.latent_tokens.shape[1]:]


class ImageFolderDecoder(nn.Module):
    """Latent tokens (B, s*s, Dd) -> images (B, 3, H, W), not clamped."""

    def __init__(self, cfg: ImageFolderConfig) -> None:
        super().__init__()
        self.side = cfg.latent_side
        self.model = VisionTransformer(
            cfg.image_size, cfg.patch_size, cfg.dec_width, cfg.dec_depth, cfg.dec_heads, cfg.mlp_ratio,
            init_values=cfg.layer_scale_init, drop_path_rate=cfg.drop_path,
        )
        self.model.patch_embed = nn.Identity()  # unused, and absent from the published layout
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_width))
        nn.init.normal_(self.mask_token, std=1e-6)
        self.lvl_embed = nn.Embedding(2, cfg.dec_width)
        trunc_normal_(self.lvl_embed.weight, std=math.sqrt(1 / cfg.dec_width / 3))
        self.register_buffer("lvl1LC", level_layout(1 + cfg.num_patches, [1 + cfg.tokens_per_branch]))
        self.to_pixel = ToPixel(cfg.dec_width, cfg.patch_size, channels=3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n = self.model.num_patches
        b = z.shape[0]
        x = self.model.add_cls_and_pos(self.mask_token.expand(b, n, -1))  # (B, 1+N, Dd)
        cls = self.model.cls_token.expand(b, -1, -1)
        latents = torch.cat([cls, z], dim=1) + _latent_pos(self.model, self.side)  # (B, 1+s*s, Dd)
        x = torch.cat([x, latents], dim=1) + self.lvl_embed(self.lvl1LC)
        x = self.model.run(x)
        return self.to_pixel(x[:, 1:1 + n])


@dataclass
class ImageFolderEncoding:
    """Encoder side of a forward: ``features`` (B, G*C, s, s) before quantization, ``quantized`` the
    straight-through f_hat in the same layout, ``codes`` (B, G, L) int64 and the product quantizer's raw
    output (losses, usage; its ``indices`` / ``quantized`` in the product's own layout)."""

    features: torch.Tensor
    quantized: torch.Tensor
    codes: torch.Tensor
    quantizer: QuantizerOutput


@dataclass
class ImageFolderOutput:
    """``forward``: reconstruction (B, 3, H, W) unclamped, the straight-through f_hat (B, G*C, s, s),
    codes (B, G, L) and the quantizer output (losses, usage)."""

    reconstruction: torch.Tensor
    quantized: torch.Tensor
    codes: torch.Tensor
    quantizer: QuantizerOutput


def _branch_quantizer(cfg: ImageFolderConfig) -> Quantizer:
    if cfg.multi_scale:
        return MultiScaleResidualQuantizer(
            cfg.codebook_size, cfg.code_dim, cfg.scales, cosine=cfg.codebook_l2_norm, beta=cfg.beta,
            quant_resi=cfg.quant_resi, share_quant_resi=cfg.share_quant_resi,
            dropout_prob=cfg.codebook_drop, dropout_start=cfg.start_drop,
        )
    return VectorQuantizer(cfg.codebook_size, cfg.code_dim, cosine=cfg.codebook_l2_norm, beta=cfg.beta)


@register_model_class
class ImageFolderModel(DiscreteTokenizerSurface, nn.Module):
    """XQ-GAN SC / ImageFolder tokenizer (module docstring). ``encode`` images -> codes (B, G, L);
    ``decode`` codes -> images in [-1, 1]; ``quantize`` / ``decode_fhat`` go through f_hat (B, G*C, s, s)."""

    config_class = ImageFolderConfig
    # Training-only tensors of the released checkpoints (FORMATS.md 2.3 and 5).
    IGNORED_KEYS = (
        "semantic_model.*", "detail_model.*", "sem_linear.*", "discriminator.*", "disc.*", "perceptual_loss.*",
        "lpips.*", "*.ema_vocab_hit_SV", "*.codebook_used", "decoder.model.patch_embed.*",
    )
    # Usage statistics: informational, so a file without them still loads.
    OPTIONAL_KEYS = ("*.ema_vocab_hit_SV",)

    def __init__(self, config: ImageFolderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ImageFolderEncoder(config)
        self.quant_conv = nn.Conv2d(config.enc_width, config.code_dim, 1)
        quantizers = [_branch_quantizer(config) for _ in range(config.num_branches)]
        if config.num_branches == 1:
            # The published key is ``quantize.*``, which is also the name of our ``quantize`` method: register
            # the module under that name directly and reach it through ``branch_quantizers``.
            self._modules["quantize"] = quantizers[0]
        else:
            self.quantizes = nn.ModuleList(quantizers)
        self.post_quant_conv = nn.Conv2d(config.num_branches * config.code_dim, config.dec_width, 1)
        self.decoder = ImageFolderDecoder(config)

    # ------------------------------------------------------------------------------------ description

    @property
    def branch_quantizers(self) -> list[Quantizer]:
        """The G per-branch quantizers, in channel order (``quantizes.{g}`` or the single ``quantize``)."""
        if self.config.num_branches == 1:
            return [self._modules["quantize"]]  # type: ignore[list-item]
        return list(self.quantizes)

    @property
    def product(self) -> ProductQuantizer:
        """The branches as one :class:`ProductQuantizer` over channel groups (built on demand, sharing the
        branch modules, so that the state dict keeps the published names)."""
        return ProductQuantizer(self.branch_quantizers, channel_dim=1 if self.config.multi_scale else -1)

    @classmethod
    def code_structure_for(cls, config: ImageFolderConfig) -> CodeStructure:
        """One image's codes (G, L): per branch, the scales coarse to fine, each p*p row-major; ``-1`` marks
        a scale dropped by quantizer dropout; the quantized map is (G*C, s, s)."""
        c = config
        return CodeStructure(axes=("branch", "position"), shape=(c.num_branches, c.num_codes),
                             codebook_size=c.codebook_size, code_dim=c.code_dim,
                             layout="per branch: scales coarse to fine, each p*p row-major",
                             scales=tuple(int(p) for p in c.scales),
                             latent_shape=(c.num_branches * c.code_dim, c.latent_side, c.latent_side),
                             quantizer="msrq" if c.multi_scale else "vq", droppable=c.multi_scale)

    @property
    def fhat_shape(self) -> tuple[int, int, int]:
        """(G*C, s, s) of one image's f_hat."""
        c = self.config
        return (c.num_branches * c.code_dim, c.latent_side, c.latent_side)

    # ------------------------------------------------------------------------------------ encoder side

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images (B, 3, {s}, {s}), got {tuple(images.shape)}")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> pre-quantization features (B, G*C, s, s), branch g in channels
        [g*C, (g+1)*C) (the published ``encode`` gives the same values as (B, C, G*s*s, 1))."""
        self._check_images(images)
        c = self.config
        h = self.encoder(images)  # (B, G*s*s, De)
        b, n, d = h.shape
        f = self.quant_conv(h.transpose(1, 2).reshape(b, d, n, 1))  # (B, C, G*s*s, 1)
        s = c.latent_side
        return f.reshape(b, c.code_dim, c.num_branches, s, s).transpose(1, 2).reshape(b, -1, s, s)

    def _product_forward(self, f: torch.Tensor) -> tuple[QuantizerOutput, torch.Tensor, torch.Tensor]:
        """f (B, G*C, s, s) -> (quantizer output, straight-through quantized (B, G*C, s, s), codes (B, G, L))."""
        b = f.shape[0]
        if self.config.multi_scale:
            out = self.product(f)
            return out, out.quantized, out.indices.transpose(1, 2).contiguous()
        out = self.product(f.permute(0, 2, 3, 1))  # per-vector VQ: channel-last
        codes = out.indices.reshape(b, -1, self.config.num_branches).transpose(1, 2).contiguous()
        return out, out.quantized.permute(0, 3, 1, 2), codes

    def encode_full(self, images: torch.Tensor) -> ImageFolderEncoding:
        """images -> features, the quantizer output (losses / usage; dropout in training) and codes."""
        f = self.features(images)
        out, quantized, codes = self._product_forward(f)
        return ImageFolderEncoding(features=f, quantized=quantized, codes=codes, quantizer=out)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, G, L) int64 (:attr:`code_structure`)."""
        return self.encode_full(images).codes

    def codes_to_fhat(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, G, L) int64 (``-1``: dropped) -> f_hat (B, G*C, s, s), the sum over scales of the
        upsampled, Phi-refined codes of each branch."""
        g, n = self.code_shape
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (g, n):
            raise ValueError(f"expected codes (B, {g}, {n}), got {tuple(codes.shape)}")
        if bool(((codes < -1) | (codes >= self.config.codebook_size)).any()):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size}) (or -1 for dropped)")
        idx = codes.transpose(1, 2)  # (B, L, G): the product's layout
        if self.config.multi_scale:
            return self.product.indices_to_codes(idx)
        s = self.config.latent_side
        return self.product.indices_to_codes(idx.reshape(-1, s, s, g)).permute(0, 3, 1, 2)

    def quantize(self, images: torch.Tensor) -> torch.Tensor:
        """images -> f_hat (B, G*C, s, s) of their codes, exactly as :meth:`decode` sees it (the
        published ``f_to_idxBl_or_fhat(to_fhat=True)`` last entry, per branch, concatenated)."""
        return self.codes_to_fhat(self.encode(images))

    # ------------------------------------------------------------------------------------ decoder side

    def decode_unclamped(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, G*C, s, s) -> images (B, 3, H, W), not clamped (the training reconstruction)."""
        if f_hat.dim() != 4 or tuple(f_hat.shape[1:]) != self.fhat_shape:
            raise ValueError(f"expected f_hat (B, {', '.join(map(str, self.fhat_shape))}), got {tuple(f_hat.shape)}")
        z = self.post_quant_conv(f_hat).flatten(2).transpose(1, 2)  # (B, s*s, Dd)
        return self.decoder(z)

    def decode_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, G*C, s, s) -> images (B, 3, H, W) clamped to [-1, 1] (published ``fhat_to_img``)."""
        return self.decode_unclamped(f_hat).clamp(-1.0, 1.0)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, G, L) int64 -> images (B, 3, H, W) in [-1, 1]."""
        return self.decode_fhat(self.codes_to_fhat(codes))

    def forward(self, images: torch.Tensor) -> ImageFolderOutput:
        """Training forward: images -> unclamped reconstruction of the straight-through f_hat, codes, losses.

        Quantizer dropout (``codebook_drop``) is drawn per branch here; the published code draws one count of
        kept scales per sample shared by both branches."""
        enc = self.encode_full(images)
        return ImageFolderOutput(self.decode_unclamped(enc.quantized), enc.quantized, enc.codes, enc.quantizer)

    # ------------------------------------------------------------------------------------ VAR helpers

    def _msrq_branches(self) -> list[MultiScaleResidualQuantizer]:
        if not self.config.multi_scale:
            raise ValueError("next-scale prediction needs a multi-scale tokenizer (len(scales) > 1)")
        return self.branch_quantizers  # type: ignore[return-value]

    def embed_scale(self, si: int, codes: torch.Tensor) -> torch.Tensor:
        """Codes of scale ``si`` (B, G, p*p) -> un-normalised code maps (B, G*C, p, p), branches stacked."""
        return torch.cat([q.embed_scale(si, codes[:, g]) for g, q in enumerate(self._msrq_branches())], dim=1)

    def next_scale_input(self, si: int, f_hat: torch.Tensor, codes: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """VAR inference: add scale ``si``'s codes (B, G, p*p) to f_hat (B, G*C, s, s); return the new f_hat
        and the next scale's input map (B, G*C, p', p') (f_hat itself after the last scale)."""
        branches = self._msrq_branches()
        c = self.config.code_dim
        outs = [q.next_scale_input(si, f_hat[:, g * c:(g + 1) * c], q.embed_scale(si, codes[:, g]))
                for g, q in enumerate(branches)]
        return torch.cat([o[0] for o in outs], dim=1), torch.cat([o[1] for o in outs], dim=1)

    def teacher_forcing_input(self, codes: torch.Tensor) -> torch.Tensor:
        """VAR training input of codes (B, G, L): (B, L - p0*p0, G*C), branches concatenated on channels
        (published ``idxBl_to_var_input``)."""
        return torch.cat([q.teacher_forcing_input(codes[:, g]) for g, q in enumerate(self._msrq_branches())],
                         dim=-1)


# --------------------------------------------------------------------------------------------- named configs


def _published(codebook_size: int, branches: int, dim: int, scales: tuple[int, ...], drop: float,
               notes: str) -> ImageFolderConfig:
    return ImageFolderConfig(num_branches=branches, code_dim=dim, codebook_size=codebook_size, scales=scales,
                             codebook_drop=drop, start_drop=3, trained_on="ImageNet-1k", notes=notes)


PUBLISHED: dict[str, tuple[Any, ...]] = {
    "imagefolder-msvr10p2-4096": (4096, 2, 32, IMAGEFOLDER_SCALES, 0.1,
                                  "XQ-GAN MSVR10P2-4096 (= ImageFolder): 2 x 286 codes, 4096 each"),
    "imagefolder-msvr10p2-8192": (8192, 2, 32, IMAGEFOLDER_SCALES, 0.1,
                                  "XQ-GAN MSVR10P2-8192: 2 x 286 codes, 8192 each"),
    "imagefolder-msvr10p2-16384": (16384, 2, 32, IMAGEFOLDER_SCALES, 0.1,
                                   "XQ-GAN MSVR10P2-16384: 2 x 286 codes, 16384 each"),
    "xqgan-vp2-4096": (4096, 2, 32, (16,), 0.1, "XQ-GAN VP2-4096: single-scale VQ, 2 x 256 codes, 4096 each"),
    "xqgan-vp2-16384": (16384, 2, 32, (16,), 0.1,
                        "XQ-GAN VP2-16384: single-scale VQ, 2 x 256 codes, 16384 each"),
    "xqgan-vq-4096": (4096, 1, 64, (16,), 0.0, "XQ-GAN VQ-4096 (RobustTok XQGAN-4096): 256 codes, 4096, dim 64"),
    "xqgan-vq-8192": (8192, 1, 32, (16,), 0.0, "XQ-GAN VQ-8192 (RobustTok XQGAN-8192): 256 codes, 8192, dim 32"),
}

SMALL: dict[str, tuple[ImageFolderConfig, str]] = {
    "imagefolder-tiny-64": (
        ImageFolderConfig(image_size=64, patch_size=8, enc_width=64, enc_depth=2, enc_heads=2, dec_width=64,
                          dec_depth=2, dec_heads=2, num_branches=2, code_dim=8, codebook_size=64,
                          scales=(1, 2, 3, 4), notes="for fast tests"),
        "64px, patch 8, 2 branches x 30 codes (scales 1,2,3,4), 64 codes each, width 64 / depth 2 (tests)",
    ),
    "imagefolder-s-64": (
        ImageFolderConfig(image_size=64, patch_size=8, enc_width=128, enc_depth=4, enc_heads=4, dec_width=128,
                          dec_depth=4, dec_heads=4, num_branches=2, code_dim=8, codebook_size=512,
                          scales=(1, 2, 3, 4, 6, 8), codebook_drop=0.1, start_drop=2,
                          notes="the shipped CPU-scale ImageFolder tokenizer (weights/default/imagefolder)"),
        "64px, patch 8, 2 branches x 130 codes (scales 1,2,3,4,6,8), 512 codes each, width 128 / depth 4",
    ),
}


def _register() -> None:
    for name, spec in PUBLISHED.items():
        cfg = _published(*spec)
        register_config(name, ImageFolderModel, lambda cfg=cfg: cfg, spec[-1])
    for name, (cfg, desc) in SMALL.items():
        register_config(name, ImageFolderModel, lambda cfg=cfg: dataclasses.replace(cfg), desc)


_register()

__all__ = [
    "CodeStructure",
    "ImageFolderConfig",
    "ImageFolderDecoder",
    "ImageFolderEncoder",
    "ImageFolderEncoding",
    "ImageFolderModel",
    "ImageFolderOutput",
    "OFFICIAL_VITS",
    "level_layout",
]
