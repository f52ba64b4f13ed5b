"""SoftVQ-VAE: a 1-D continuous image tokenizer (Chen et al., 2024), key-compatible with the published files.

    images (B, 3, H, W) in [-1, 1]
      -> encoder: ViT over [cls, H/p*W/p patches, L latent tokens], keep the last L outputs  (B, L, De)
      -> quant_conv (Linear De -> d)                                                          (B, L, d)
      -> quantize: soft VQ (K codebooks over contiguous token segments)                       (B, L, d)  = tokens
      -> post_quant_conv (Linear d -> Dd)
      -> decoder: ViT over [cls, N mask tokens, L latents], keep tokens [1 : 1+N], linear to pixels,
         unpatchify (channel-last patch vectors)                                              (B, 3, H, W)

State-dict keys are exactly those of FORMATS.md 1.4 (``encoder.latent_tokens``, ``encoder.model.*``,
``quant_conv``, ``quantize.embedding``, ``quantize.codebook_used``, ``post_quant_conv``,
``decoder.mask_token``, ``decoder.latent_pos_embed``, ``decoder.model.*`` including the unused
``decoder.model.patch_embed.*``, ``decoder.to_pixel.model``). The generator models the tokens normalised
with ``(tokens - vq_mean) / vq_std`` (:meth:`SoftVQModel.normalize_latents`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from models.latent_norm import LatentNormMixin
from models.layers.vit import ToPixel, VisionTransformer
from models.official import check_official_fields
from models.quantizers.soft import SoftQuantizerOutput, SoftQuantizerSettings
from models.registry import register_config, register_model_class
from models.surface import ContinuousTokenizerSurface

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- config

# timm DINOv2 backbones named in the official config.json -> (width, depth, heads); mlp ratio 4, patch
# re-set to ``enc_patch_size`` / ``dec_patch_size``.
OFFICIAL_VITS: dict[str, tuple[int, int, int]] = {
    "vit_small_patch14_dinov2": (384, 12, 6),
    "vit_base_patch14_dinov2": (768, 12, 12),
    "vit_large_patch14_dinov2": (1024, 24, 16),
}
VIT_B = OFFICIAL_VITS["vit_base_patch14_dinov2"]
VIT_L = OFFICIAL_VITS["vit_large_patch14_dinov2"]


@dataclass(frozen=True)
class SoftVQConfig(SoftQuantizerSettings):
    """Architecture and latent statistics of a SoftVQ-VAE (all fields JSON-serialisable).

    ``quantizer`` is one of ``soft`` (published), ``gmm``, ``product`` (``num_groups`` channel groups) or
    ``residual`` (``num_levels`` levels); see :mod:`models.quantizers.soft`. ``entropy_weight`` /
    ``entropy_tau`` set the training-only KL term ``losses["entropy"] = entropy_weight * (H(q) - H(E_x q))``
    (default weight 1: the raw term, which the training loop weighs). ``vq_mean`` /
    ``vq_std`` are the scalars that normalise tokens for the generator (published values from each release's
    config; 0 / 1 until a trained model's statistics are measured).
    """

    image_size: int = 256
    patch_size: int = 16
    num_tokens: int = 64
    token_dim: int = 32
    enc_width: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_width: int = 768
    dec_depth: int = 12
    dec_heads: int = 12
    mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-5
    drop_path: float = 0.0
    codebook_size: int = 8192
    vq_mean: float = 0.0
    vq_std: float = 1.0
    trained_on: str = ""
    notes: str = ""
    load_warnings: tuple[str, ...] = ()  # found when the config was read (e.g. no latent statistics); shown by /v1/models

    def __post_init__(self) -> None:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} not a multiple of patch_size {self.patch_size}")
        problems += self.quantizer_problems(self.num_tokens, self.token_dim)
        if self.enc_width % self.enc_heads or self.dec_width % self.dec_heads:
            problems.append("widths must be divisible by their head counts")
        if self.vq_std <= 0:
            problems.append(f"vq_std must be > 0, got {self.vq_std}")
        if problems:
            raise ValueError("invalid SoftVQConfig: " + "; ".join(problems))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    # ------------------------------------------------------------------ the official config.json (ModelArgs)

    @staticmethod
    def matches_official(d: dict[str, Any]) -> bool:
        """Whether ``d`` looks like the published SoftVQ ``config.json`` (the ``ModelArgs`` dataclass)."""
        return "class_name" not in d and "encoder_model" in d and "num_latent_tokens" in d

    @classmethod
    def from_official(cls, d: dict[str, Any]) -> SoftVQConfig:
        """Translate a published ``config.json``; unsupported variants raise ``ValueError`` naming the field.

        Every field must be listed in :data:`models.official.OFFICIAL_FIELDS` (honoured, or ignored for the
        reason given there, e.g. ``enc_pretrained`` / ``repa*`` / loss weights are training-only); others are
        refused. Missing fields take the official ``ModelArgs`` defaults, except that missing ``vq_mean`` /
        ``vq_std`` are logged and recorded in ``load_warnings``: generators would then see unnormalised tokens.
        """
        check_official_fields("softvq", d)
        for key in ("enc_type", "dec_type"):
            if d.get(key, "vit") != "vit":
                raise ValueError(f"official config: {key}={d[key]!r} is not supported (only 'vit')")
        for key in ("enc_tuning_method", "dec_tuning_method"):
            if d.get(key, "full") != "full":
                raise ValueError(f"official config: {key}={d[key]!r} is not supported (only 'full')")
        if not d.get("use_ape", True):
            raise ValueError("official config: use_ape=false (the axial-RoPE position path) is not supported; only "
                             "learned absolute position embeddings (use_ape=true) are implemented")
        if d.get("use_rope", False):
            raise ValueError("official config: use_rope=true (RoPE tokenizers) is not supported")
        if d.get("to_pixel", "linear") != "linear":
            raise ValueError(f"official config: to_pixel={d['to_pixel']!r} is not supported (only 'linear')")
        if not d.get("dec_cls_token", True):
            raise ValueError("official config: dec_cls_token=false is not supported")
        warnings = []
        missing = [k for k in ("vq_mean", "vq_std") if k not in d]
        if missing:
            warnings.append(f"the config has no {' / '.join(missing)}: latent statistics default to mean 0 / std 1, "
                            "so a generator would see unnormalised tokens (measure them with "
                            "`python -m training.evaluate compute-latent-stats`)")
            _log.warning("official SoftVQ config (encoder %s): %s", d.get("encoder_model"), warnings[-1])
        enc_patch, dec_patch = _patch(d.get("enc_patch_size", 16)), _patch(d.get("dec_patch_size", 16))
        if enc_patch != dec_patch:
            raise ValueError(f"official config: enc_patch_size {enc_patch} != dec_patch_size {dec_patch}")
        enc_w, enc_d, enc_h = _official_vit(d["encoder_model"], "encoder_model")
        dec_w, dec_d, dec_h = _official_vit(d.get("decoder_model", ""), "decoder_model")
        return cls(
            image_size=int(d.get("image_size", 256)),
            patch_size=enc_patch,
            num_tokens=int(d["num_latent_tokens"]),
            token_dim=int(d.get("codebook_embed_dim", 8)),
            enc_width=enc_w,
            enc_depth=enc_d,
            enc_heads=enc_h,
            dec_width=dec_w,
            dec_depth=dec_d,
            dec_heads=dec_h,
            codebook_size=int(d.get("codebook_size", 16384)),
            num_codebooks=int(d.get("num_codebooks", 1)),
            tau=float(d.get("tau", 0.1)),
            codebook_l2_norm=bool(d.get("codebook_l2_norm", True)),
            vq_mean=float(d.get("vq_mean", 0.0)),
            vq_std=float(d.get("vq_std", 1.0)),
            notes=f"from official config.json: encoder {d['encoder_model']}, decoder {d.get('decoder_model')}",
            load_warnings=tuple(warnings),
        )


def _patch(v: Any) -> int:
    if isinstance(v, list | tuple):
        if len(set(v)) != 1:
            raise ValueError(f"official config: non-square patch size {v} is not supported")
        v = v[0]
    return int(v)


def _official_vit(name: str, field_name: str) -> tuple[int, int, int]:
    base = str(name).split(".")[0]
    if base not in OFFICIAL_VITS:
        raise ValueError(f"official config: {field_name}={name!r} is not supported; known: {sorted(OFFICIAL_VITS)}")
    return OFFICIAL_VITS[base]


# --------------------------------------------------------------------------------------------- modules


class SoftVQEncoder(nn.Module):
    """Images (B, 3, H, W) -> the last L outputs of a ViT over [cls, patches, latent tokens] (B, L, De)."""

    def __init__(self, cfg: SoftVQConfig) -> None:
        super().__init__()
        self.num_tokens = cfg.num_tokens
        self.model = VisionTransformer(
            cfg.image_size, cfg.patch_size, cfg.enc_width, cfg.enc_depth, cfg.enc_heads, cfg.mlp_ratio,
            init_values=cfg.layer_scale_init, drop_path_rate=cfg.drop_path,
        )
        self.latent_tokens = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.enc_width))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.enc_width))
        nn.init.normal_(self.latent_tokens, std=0.02)
        trunc_normal_(self.latent_pos_embed, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.add_cls_and_pos(self.model.patchify(images))  # (B, 1+N, De)
        latents = self.latent_tokens.expand(x.shape[0], -1, -1) + self.latent_pos_embed
        x = self.model.run(torch.cat([x, latents], dim=1))
        return x[:, -self.num_tokens:]


class SoftVQDecoder(nn.Module):
    """Latents (B, L, Dd) -> images (B, 3, H, W): ViT over [cls, N mask tokens, latents], pixel head."""

    def __init__(self, cfg: SoftVQConfig) -> None:
        super().__init__()
        self.model = VisionTransformer(
            cfg.image_size, cfg.patch_size, cfg.dec_width, cfg.dec_depth, cfg.dec_heads, cfg.mlp_ratio,
            init_values=cfg.layer_scale_init, drop_path_rate=cfg.drop_path,
        )  # model.patch_embed is unused (kept: it is in the current official key layout)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_width))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dec_width))
        nn.init.normal_(self.mask_token, std=0.02)
        trunc_normal_(self.latent_pos_embed, std=0.02)
        self.to_pixel = ToPixel(cfg.dec_width, cfg.patch_size, channels=3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n = self.model.num_patches
        x = self.model.add_cls_and_pos(self.mask_token.expand(z.shape[0], n, -1))  # (B, 1+N, Dd)
        x = self.model.run(torch.cat([x, z + self.latent_pos_embed], dim=1))
        return self.to_pixel(x[:, 1 : 1 + n])


@dataclass
class SoftVQEncoding:
    """Training-time encoder outputs: tokens (B, L, d) (= quantizer.quantized), features (B, L, d) before
    quantization (the ``quant_conv`` output), and the full :class:`SoftQuantizerOutput`."""

    tokens: torch.Tensor
    features: torch.Tensor
    quantizer: SoftQuantizerOutput


@dataclass
class SoftVQOutput:
    """``forward``: reconstruction (B, 3, H, W) unclamped, tokens (B, L, d), quantizer output."""

    reconstruction: torch.Tensor
    tokens: torch.Tensor
    quantizer: SoftQuantizerOutput


@register_model_class
class SoftVQModel(ContinuousTokenizerSurface, LatentNormMixin, nn.Module):
    """SoftVQ-VAE tokenizer. ``encode`` (B, 3, H, W) in [-1, 1] -> (B, L, D); ``decode`` back (unclamped)."""

    config_class = SoftVQConfig
    # Extra tensors of released / training checkpoints that carry nothing for this model (FORMATS.md 5).
    IGNORED_KEYS = (
        "repa_model.*", "projection.*", "projector.*", "semantic_model.*", "detail_model.*", "sem_linear.*",
        "discriminator.*", "disc.*", "perceptual_loss.*", "lpips.*", "*.ema_vocab_hit_SV",
    )
    # Released SoftVQ files lack the unused decoder patch embedding; the usage history is informational.
    OPTIONAL_KEYS = ("decoder.model.patch_embed.*", "quantize.codebook_used")

    def __init__(self, config: SoftVQConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = SoftVQEncoder(config)
        self.quant_conv = nn.Linear(config.enc_width, config.token_dim)
        self.quantize = config.build_quantizer(config.token_dim)
        self.post_quant_conv = nn.Linear(config.token_dim, config.dec_width)
        self.decoder = SoftVQDecoder(config)

    # ------------------------------------------------------------------------------------------ serving

    # ------------------------------------------------------------------------------------------ compute

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images (B, 3, {s}, {s}), got {tuple(images.shape)}")

    def encode_full(self, images: torch.Tensor, compute_losses: bool = True) -> SoftVQEncoding:
        """images (B, 3, H, W) in [-1, 1] -> tokens, pre-quantization features and quantizer output."""
        self._check_images(images)
        features = self.quant_conv(self.encoder(images))
        q = self.quantize(features, compute_losses)
        return SoftVQEncoding(tokens=q.quantized, features=features, quantizer=q)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> continuous tokens (B, L, D)."""
        return self.encode_full(images, compute_losses=False).tokens

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, D) -> images (B, 3, H, W), roughly in [-1, 1], not clamped."""
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != self.token_shape:
            raise ValueError(f"expected tokens (B, {self.token_shape[0]}, {self.token_shape[1]}), got {tuple(tokens.shape)}")
        return self.decoder(self.post_quant_conv(tokens))

    def forward(self, images: torch.Tensor) -> SoftVQOutput:
        """images (B, 3, H, W) -> reconstruction (unclamped), tokens and the quantizer output (with losses)."""
        enc = self.encode_full(images, compute_losses=True)
        return SoftVQOutput(reconstruction=self.decode(enc.tokens), tokens=enc.tokens, quantizer=enc.quantizer)


# --------------------------------------------------------------------------------------------- named configs


def _published(
    enc: tuple[int, int, int], dec: tuple[int, int, int], tokens: int, dim: int, mean: float, std: float,
    image_size: int = 256, notes: str = "",
) -> SoftVQConfig:
    return SoftVQConfig(
        image_size=image_size, patch_size=16, num_tokens=tokens, token_dim=dim,
        enc_width=enc[0], enc_depth=enc[1], enc_heads=enc[2], dec_width=dec[0], dec_depth=dec[1], dec_heads=dec[2],
        codebook_size=8192, num_codebooks=4, tau=0.07, vq_mean=mean, vq_std=std,
        trained_on="ImageNet-1k", notes=notes,
    )


# name -> (encoder, decoder, tokens, token dim, vq_mean, vq_std, image size, description). FORMATS.md 1.2.
PUBLISHED: dict[str, tuple[Any, ...]] = {
    "softvq-b-32": (VIT_B, VIT_B, 32, 64, -0.0001770356, 0.029009325, 256,
                    "SoftVQVAE/softvq-b-32: 256px, 32x64 tokens, ViT-B enc / ViT-B dec (mean/std unverified)"),
    "softvq-bl-32": (VIT_B, VIT_L, 32, 64, 0.0010870857, 0.028672216, 256,
                     "SoftVQVAE/softvq-bl-32: 256px, 32x64 tokens, ViT-B enc / ViT-L dec (mean/std unverified)"),
    "softvq-l-32": (VIT_B, VIT_L, 32, 64, 0.00060894643, 0.029030401, 256,
                    "SoftVQVAE/softvq-l-32: 256px, 32x64 tokens; the release is ViT-B enc / ViT-L dec"),
    "softvq-b-64": (VIT_B, VIT_B, 64, 32, -0.003192751, 0.07235257, 256,
                    "SoftVQVAE/softvq-b-64: 256px, 64x32 tokens, ViT-B enc / ViT-B dec"),
    "softvq-bl-64": (VIT_B, VIT_L, 64, 32, -0.00077168207, 0.07157949, 256,
                     "SoftVQVAE/softvq-bl-64: 256px, 64x32 tokens, ViT-B enc / ViT-L dec"),
    "softvq-l-64": (VIT_L, VIT_L, 64, 32, 0.0009714666, 0.07259091, 256,
                    "SoftVQVAE/softvq-l-64: 256px, 64x32 tokens, ViT-L enc / ViT-L dec"),
    "softvq-bl-64-512": (VIT_B, VIT_L, 64, 32, -0.0021498345, 0.073663734, 512,
                         "SoftVQVAE/softvq-bl-64-512: 512px, 64x32 tokens, ViT-B enc / ViT-L dec (mean/std unverified)"),
    "softvq-l-32-512": (VIT_B, VIT_L, 32, 64, -0.0011922447, 0.028908715, 512,
                        "SoftVQVAE/softvq-l-32-512: 512px, 32x64 tokens, ViT-B enc / ViT-L dec (mean/std unverified)"),
}


def _small(tokens: int, dim: int, width: int, depth: int, heads: int, codebook_size: int, notes: str) -> SoftVQConfig:
    return SoftVQConfig(
        image_size=64, patch_size=8, num_tokens=tokens, token_dim=dim,
        enc_width=width, enc_depth=depth, enc_heads=heads, dec_width=width, dec_depth=depth, dec_heads=heads,
        codebook_size=codebook_size, num_codebooks=4, tau=0.07, notes=notes,
    )


SMALL: dict[str, tuple[SoftVQConfig, str]] = {
    "softvq-tiny-64": (
        _small(64, 32, 128, 2, 4, 256, "for fast tests"),
        "64px, patch 8, 64x32 tokens, width 128 / depth 2 (tests; random weights are fine)",
    ),
    "softvq-s-64": (
        _small(64, 32, 256, 6, 4, 1024, "shipped default, trained on Tiny ImageNet 64x64 on the CPU"),
        "64px, patch 8, 64x32 tokens, width 256 / depth 6, 4x1024 codes (the shipped CPU default)",
    ),
    "softvq-s-32": (
        _small(32, 64, 256, 6, 4, 1024, "32-token variant of softvq-s-64"),
        "64px, patch 8, 32x64 tokens, width 256 / depth 6, 4x1024 codes",
    ),
}


def _register() -> None:
    for name, (enc, dec, tokens, dim, mean, std, size, desc) in PUBLISHED.items():
        cfg = _published(enc, dec, tokens, dim, mean, std, size, notes=desc)
        register_config(name, SoftVQModel, lambda cfg=cfg: cfg, desc)
    for name, (cfg, desc) in SMALL.items():
        register_config(name, SoftVQModel, lambda cfg=cfg: dataclasses.replace(cfg), desc)


_register()

__all__ = [
    "OFFICIAL_VITS",
    "SoftVQConfig",
    "SoftVQDecoder",
    "SoftVQEncoder",
    "SoftVQEncoding",
    "SoftVQModel",
    "SoftVQOutput",
]
