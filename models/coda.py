"""CODA: a frozen continuous VAE made discrete by attention-based multi-scale residual quantization plus LoRA
adapters on the VAE's convolutions (FORMATS.md 3.2-3.3).

    images (B, 3, H, W) in [-1, 1]
      -> vae.encode_spatial (frozen base weights + LoRA)                    latents (B, C, s, s)
      -> (latents - latent_shift) * latent_scale                            z       (B, C, s, s)
      -> CODAQuantizer (scales p_1 < ... < p_S = s, one shared codebook)    codes   (B, L) int64, L = sum p^2
                                                                             f_hat   (B, C, s, s)
      -> f_hat / latent_scale + latent_shift -> vae.decode_spatial          images  (B, 3, H, W) in [-1, 1]

Codes layout (:attr:`CODA.code_structure`): the scales concatenated coarse to fine, each ``p x p`` block
row-major; every code lies in ``[0, codebook_size)``. ``decode(encode(x))`` is exactly the quantized
reconstruction, since the quantizer emits ``to_v(codebook)[idx]`` (no straight-through arithmetic in eval).

Two VAEs: ``taef2`` (:mod:`models.taef2`, 64 px -> 32 x 8 x 8, the shipped target, weights in
``../shared/weights/taef2``) and ``kl16`` (:mod:`models.kl16`, MAR's VAE, 256 px -> 16 x 16 x 16: the
published ``mar_v16384`` layout). The whole VAE is frozen; LoRA wraps every ``Conv2d`` whose name contains one
of ``lora_targets`` (encoder and decoder alike, as published). Serving encodes with the posterior *mode*
(KL-16) where the official evaluation draws a sample, so tokens differ numerically from the official ones.

State dict: ``vae.*`` (the VAE's own names, LoRA tensors as ``<conv>.lora_layer.{down,up}.weight``) and
``quantizer.*`` (``codebooks.weight``, ``attn.to_q/to_k/to_v``, ``attn.norm_q/norm_k``). A saved folder holds
the VAE's base weights too. :meth:`CODA.from_published` reads the released per-module files (the VAE file
with the stock names plus LoRA, the quantizer file with the quantizer names, no prefixes).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from models.hub import load_into, read_state_dict
from models.kl16 import KL16, KL16Config
from models.lora import apply_lora, lora_parameters, merge_lora
from models.quantizers.base import QuantizerOutput
from models.quantizers.coda import MAR_SCALES, CODAQuantizer
from models.registry import get_config, register_config, register_model_class
from models.surface import CodeStructure, DiscreteTokenizerSurface
from models.taef2 import DEFAULT_WEIGHTS as TAEF2_WEIGHTS
from models.taef2 import TAEF2, TAEF2Config

# vae name -> (spatial downsampling, latent channels)
VAES: dict[str, tuple[int, int]] = {"taef2": (8, 32), "kl16": (16, 16)}
MAR_LORA_TARGETS: tuple[str, ...] = ("conv1", "conv2", "upsample", "downsample")  # CODA mar_v16384


@dataclass(frozen=True)
class CODAConfig:
    """A CODA tokenizer: which VAE, its LoRA, and the quantizer on its latents.

    ``scales`` are the patch sizes, coarse to fine; the last must equal the latent side
    ``image_size / downsample``. ``latent_scale`` / ``latent_shift`` map the VAE latent to the quantizer's
    input, ``z = (latent - shift) * scale`` (KL-16's own 0.2325 is already inside :class:`models.kl16.KL16`).
    ``lora_rank`` 0 means no adapters (e.g. a merged model). ``beta``, ``entropy_weight`` and
    ``entropy_temperature`` are the quantizer's training losses (:mod:`models.quantizers.coda`).
    """

    vae: str = "taef2"
    image_size: int = 64
    latent_dim: int = 32
    codebook_size: int = 4096
    scales: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    attn_dim: int = 32
    rms_norm: bool = True
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("encoder", "decoder")
    latent_scale: float = 1.0
    latent_shift: float = 0.0
    beta: float = 0.25
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    trained_on: str = ""
    license: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.vae not in VAES:
            problems.append(f"vae {self.vae!r} not in {sorted(VAES)}")
        else:
            down, channels = VAES[self.vae]
            if self.image_size % down:
                problems.append(f"image_size {self.image_size} not a multiple of {down}")
            elif self.scales and self.scales[-1] != self.image_size // down:
                problems.append(f"last scale {self.scales[-1]} != latent side {self.image_size // down}")
            if self.latent_dim != channels:
                problems.append(f"latent_dim {self.latent_dim} != {self.vae}'s {channels} channels")
        if not self.scales or any(b <= a for a, b in zip(self.scales, self.scales[1:], strict=False)) \
                or self.scales[0] < 1:
            problems.append(f"scales must be positive and increasing, got {self.scales}")
        if self.lora_rank < 0 or self.codebook_size < 2 or self.latent_scale <= 0:
            problems.append("lora_rank >= 0, codebook_size >= 2 and latent_scale > 0 are required")
        if problems:
            raise ValueError("invalid CODAConfig: " + "; ".join(problems))

    @property
    def latent_side(self) -> int:
        return self.image_size // VAES[self.vae][0]

    @property
    def num_tokens(self) -> int:
        """Codes per image: ``sum(p * p)`` over the scales."""
        return sum(p * p for p in self.scales)


def build_vae(config: CODAConfig) -> nn.Module:
    """The configured VAE with random weights (no LoRA)."""
    if config.vae == "taef2":
        return TAEF2(TAEF2Config(image_size=config.image_size))
    return KL16(KL16Config(image_size=config.image_size))


@dataclass
class CODAOutput:
    """``forward``: reconstruction (B, 3, H, W) in [-1, 1], the continuous quantizer input ``latents``
    (B, C, s, s) and the quantizer output (``quantized`` = f_hat, ``indices`` = codes (B, L), losses)."""

    reconstruction: torch.Tensor
    latents: torch.Tensor
    quantizer: QuantizerOutput

    @property
    def codes(self) -> torch.Tensor:
        return self.quantizer.indices


@register_model_class
class CODA(DiscreteTokenizerSurface, nn.Module):
    """The CODA tokenizer (module docstring). ``encode`` images -> codes (B, L) int64; ``decode`` back."""

    config_class = CODAConfig

    def __init__(self, config: CODAConfig, vae: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.vae = vae if vae is not None else build_vae(config)
        self.vae.requires_grad_(False)
        self.lora_names: list[str] = []
        if config.lora_rank:
            self.lora_names = apply_lora(self.vae, config.lora_targets, config.lora_rank, kinds=(nn.Conv2d,))
            if not self.lora_names:
                raise ValueError(f"lora_targets {config.lora_targets} match no convolution of {config.vae}")
        self.quantizer = CODAQuantizer(
            config.codebook_size, config.latent_dim, config.scales, attn_dim=config.attn_dim,
            rms_norm=config.rms_norm, beta=config.beta, entropy_weight=config.entropy_weight,
            entropy_temperature=config.entropy_temperature,
        )

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def with_pretrained_vae(cls, config: CODAConfig, path: str | os.PathLike[str] | None = None,
                            *, allow_pickle: bool = False) -> CODA:
        """A CODA whose VAE base weights are loaded strictly before LoRA is added (LoRA and quantizer keep
        their fresh init). ``taef2``: the folder of ``taef2_{encoder,decoder}.pth`` (default
        ``../shared/weights/taef2``); ``kl16``: a KL-16 checkpoint (``kl16.ckpt``, needs ``allow_pickle``)."""
        if config.vae == "taef2":
            vae: nn.Module = TAEF2.from_original(TAEF2_WEIGHTS if path is None else path,
                                                 TAEF2Config(image_size=config.image_size))
        else:
            if path is None:
                raise ValueError("kl16 needs the path of its checkpoint")
            vae = build_vae(config)
            load_into(vae, read_state_dict(path, allow_pickle=allow_pickle))
        return cls(config, vae=vae.train())

    @classmethod
    def from_published(cls, vae_path: str | os.PathLike[str], quantizer_path: str | os.PathLike[str],
                       config: CODAConfig | None = None, *, allow_pickle: bool = False) -> CODA:
        """Load the released per-module files (FORMATS.md 3.3): ``vae*.pth`` (stock VAE names + LoRA) and
        ``quantizer*.pth`` (``codebooks.weight``, ``attn.*``). Defaults to the ``coda-mar-v16384`` config;
        the scales are not in the weights and must come from the config. Returns the model in eval mode."""
        model = cls(config or get_config("coda-mar-v16384"))
        model.load_published_vae(read_state_dict(vae_path, allow_pickle=allow_pickle))
        model.load_published_quantizer(read_state_dict(quantizer_path, allow_pickle=allow_pickle))
        return model.eval()

    def load_published_vae(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Strictly load a released VAE state dict (stock names plus ``lora_layer`` tensors) into ``vae``."""
        load_into(self.vae, state_dict, strict=True)

    def load_published_quantizer(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Strictly load a released quantizer state dict (``codebooks.weight``, ``attn.*``) into ``quantizer``."""
        load_into(self.quantizer, state_dict, strict=True)

    def merged(self) -> CODA:
        """A copy with every LoRA folded into its conv (``lora_rank`` 0 in the config): same outputs up to
        float round-off, plain VAE key layout, faster."""
        if not self.config.lora_rank:
            return copy.deepcopy(self)
        vae = copy.deepcopy(self.vae)
        merge_lora(vae)
        out = type(self)(dataclasses.replace(self.config, lora_rank=0), vae=vae)
        out.quantizer.load_state_dict(self.quantizer.state_dict())
        return out.to(next(self.quantizer.parameters()).device).train(self.training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA adapters and the quantizer: what CODA trains (the VAE's base weights stay frozen)."""
        return lora_parameters(self.vae) + list(self.quantizer.parameters())

    # ------------------------------------------------------------------------------------------ serving

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @classmethod
    def code_structure_for(cls, config: CODAConfig) -> CodeStructure:
        """One image's codes: (L,) over the scales coarse to fine, each p*p row-major; the quantized map
        is (C, s, s)."""
        c = config
        return CodeStructure(axes=("position",), shape=(c.num_tokens,), codebook_size=c.codebook_size,
                             code_dim=c.latent_dim, layout="scales coarse to fine, each p*p row-major",
                             scales=tuple(int(p) for p in c.scales),
                             latent_shape=(c.latent_dim, c.latent_side, c.latent_side), quantizer="coda")

    def _check_images(self, images: torch.Tensor) -> None:
        s = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images (B, 3, {s}, {s}), got {tuple(images.shape)}")

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 2 or codes.shape[1] != self.config.num_tokens or codes.is_floating_point():
            raise ValueError(f"expected integer codes (B, {self.config.num_tokens}), got "
                             f"{tuple(codes.shape)} {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size})")

    # ------------------------------------------------------------------------------------------ compute

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> quantizer input z (B, C, s, s) (LoRA-adapted, scaled)."""
        self._check_images(images)
        latents = self.vae.encode_spatial(images)
        return (latents - self.config.latent_shift) * self.config.latent_scale

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, C, s, s) -> quantized f_hat (B, C, s, s), codes (B, L), losses, usage."""
        return self.quantizer(z)

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, L) int64 -> f_hat (B, C, s, s), exactly the quantizer's output for those codes."""
        self._check_codes(codes)
        return self.quantizer.indices_to_codes(codes)

    def decode_latents(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, C, s, s) -> images (B, 3, H, W) in [-1, 1] (KL-16: about [-1, 1], not clamped)."""
        return self.vae.decode_spatial(f_hat / self.config.latent_scale + self.config.latent_shift)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> codes (B, L) int64 (layout: :attr:`code_structure`)."""
        return self.quantize(self.encode_latents(images)).indices

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, L) int64 -> images (B, 3, H, W) in [-1, 1] (KL-16: about [-1, 1], not clamped)."""
        return self.decode_latents(self.codes_to_latents(codes))

    def forward(self, images: torch.Tensor) -> CODAOutput:
        """images (B, 3, H, W) -> reconstruction of f_hat, the quantizer input and the quantizer output."""
        z = self.encode_latents(images)
        q = self.quantize(z)
        return CODAOutput(reconstruction=self.decode_latents(q.quantized), latents=z, quantizer=q)


def infer_quantizer_fields(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``codebook_size``, ``latent_dim``, ``attn_dim``, ``rms_norm`` of a released quantizer state dict (the
    scales are not in the weights)."""
    V, C = state_dict["codebooks.weight"].shape
    return {"codebook_size": int(V), "latent_dim": int(C), "attn_dim": int(state_dict["attn.to_q.weight"].shape[0]),
            "rms_norm": "attn.norm_q.weight" in state_dict}


# --------------------------------------------------------------------------------------------- named configs

NAMED: dict[str, tuple[CODAConfig, str]] = {
    "coda-taef2-64": (
        CODAConfig(vae="taef2", image_size=64, latent_dim=32, codebook_size=4096, scales=(1, 2, 3, 4, 6, 8),
                   attn_dim=32, lora_rank=8, lora_targets=("encoder", "decoder"),
                   license="TAEF2: MIT (madebyollin/taesd)",
                   notes="shipped target: TAEF2 + LoRA r8 on every conv + CODA quantizer, 130 codes of 4096"),
        "CODA on TAEF2 at 64 px: 32x8x8 latents, scales 1,2,3,4,6,8 (130 codes), 4096 codes, LoRA r8 on all convs"
        " (build with CODA.with_pretrained_vae to start from the real TAEF2 weights)",
    ),
    "coda-mar-v16384": (
        CODAConfig(vae="kl16", image_size=256, latent_dim=16, codebook_size=16384, scales=MAR_SCALES,
                   attn_dim=32, lora_rank=32, lora_targets=MAR_LORA_TARGETS, license="MIT (LTH14/mar VAE)",
                   notes="published CODA mar_v16384 layout (FORMATS.md 3.2): KL-16 16x16x16, 680 codes"),
        "published CODA mar_v16384: KL-16 (256 px, 16x16x16), scales 1..16 (680 codes), 16384 codes, LoRA r32 "
        "on conv1/conv2/upsample/downsample; load with CODA.from_published",
    ),
}


def _register() -> None:
    for name, (cfg, desc) in NAMED.items():
        register_config(name, CODA, lambda cfg=cfg: dataclasses.replace(cfg), desc)


_register()

__all__ = ["CODA", "CODAConfig", "CODAOutput", "MAR_LORA_TARGETS", "NAMED", "VAES", "build_vae",
           "infer_quantizer_fields"]
