"""Diffusion transformers over a 1-D token sequence: the shared backbone, and DiT (learned-sigma, eps).

The backbone is the DiT / SiT transformer with patch size 1 (the SoftVQ ``vae_1d`` variant): a linear token
embedder, a fixed 1-D sin-cos position table, timestep and class embedders (with a null class for guidance)
summed into the conditioning vector ``c``, adaLN-Zero blocks, and an adaLN final layer. State-dict keys and
numerics follow the published SoftVQ SiT / DiT releases (``../shared/reference/FORMATS.md`` sections 1.3,
1.4, 1.6), so their ``model.safetensors`` files load as they are.

SiT (velocity prediction, time in [0, 1]) lives in :mod:`models.sit`; this module holds DiT (eps and learned
variance, integer diffusion step as time) and the pieces both share. Samplers live in
:mod:`models.sampling`; ``forward`` is one network evaluation and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn as nn
from timm.layers import Mlp

from models.layers.attention import attend
from models.official import check_official_fields
from models.registry import register_config, register_model_class
from models.sampling.diffusion import NOISE_SCHEDULES
from models.sampling.flow import PATH_TYPES
from models.sampling.registry import sampler_family
from models.surface import GeneratorConfigBase, SampleSpec

# Keys only the published SiT config.json has (FORMATS.md 1.3); the DiT config has none of them.
SIT_ONLY_FIELDS = frozenset({"path_type", "use_cfg", "qk_norm", "decoder_hidden_size", "encoder_depth", "z_dims"})


@dataclass(frozen=True)
class GeneratorConfig(GeneratorConfigBase):
    """Architecture and sampling defaults of a token diffusion transformer.

    ``num_tokens`` x ``token_dim`` is the latent shape (L, C) of the paired tokenizer; conditioning, the
    tokenizer and the guidance defaults are :class:`~models.surface.GeneratorConfigBase`'s. ``sampler``,
    ``steps`` and ``path_type`` are the defaults a server uses when a request leaves them out (``sampler`` one
    of the family's registered names, :func:`models.sampling.sampler_family`).
    """

    num_tokens: int = 64
    token_dim: int = 32
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    # sampling defaults (the shared ones are in GeneratorConfigBase)
    sampler: str = "sde"  # type: ignore[assignment]
    steps: int = 250  # type: ignore[assignment]
    path_type: str = "linear"  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if type(self) is GeneratorConfig:
            raise TypeError("GeneratorConfig is a base class: use SiTConfig or DiTConfig")
        problems = self.check_base()
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 2:
            problems.append("hidden_size must be even (sin-cos position table)")
        names = sampler_family(self.family).samplers
        if self.sampler not in names:
            problems.append(f"sampler {self.sampler!r} is not one of {names} for {self.family}")
        if self.path_type not in PATH_TYPES:
            problems.append(f"path_type {self.path_type!r} is not one of {PATH_TYPES}")
        if problems:
            raise ValueError("; ".join(problems))

    def sample_spec(self) -> SampleSpec:
        """Normalised latents (L, C) float32."""
        return SampleSpec((self.num_tokens, self.token_dim), "float32")

    @property
    def out_channels(self) -> int:
        return 2 * self.token_dim if self.learn_sigma else self.token_dim

    # ------------------------------------------------------------------ published config.json translation

    @classmethod
    def _official_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
        """The fields SiT and DiT share; every field of ``d`` must be in ``models.official.OFFICIAL_FIELDS``."""
        check_official_fields(cls.family, d)
        if int(d.get("patch_size", 1)) != 1 or not d.get("vae_1d", False):
            raise ValueError("only the 1-D token variant (vae_1d=true, patch_size=1) of the published "
                             f"{cls.family.upper()} is supported; got patch_size={d.get('patch_size')}, "
                             f"vae_1d={d.get('vae_1d')}")
        if d.get("qk_norm", False):
            raise ValueError("qk_norm=true is not supported (the published generators have qk_norm=false)")
        if float(d.get("class_dropout_prob", 0.1)) <= 0:
            raise ValueError(f"class_dropout_prob={d['class_dropout_prob']!r} is not supported: the official label "
                             "embedder then has no null-class row, and ours always has one (guidance)")
        return {
            "num_tokens": int(d["input_size"]),
            "token_dim": int(d["in_channels"]),
            "hidden_size": int(d["hidden_size"]),
            "depth": int(d["depth"]),
            "num_heads": int(d["num_heads"]),
            "mlp_ratio": float(d.get("mlp_ratio", 4.0)),
            "num_classes": int(d.get("num_classes", 1000)),
            "class_dropout_prob": float(d.get("class_dropout_prob", 0.1)),
        }


# ------------------------------------------------------------------------------------------- layers


def sincos_1d(length: int, dim: int) -> torch.Tensor:
    """(length, dim) float32 sin-cos table, sin in even and cos in odd channels (SoftVQ
    ``positionalencoding1d``): ``pe[p, 2i] = sin(p * w_i)``, ``pe[p, 2i+1] = cos(p * w_i)``,
    ``w_i = exp(2i * -(ln 1e4 / dim))``, computed in float32 on the CPU."""
    position = torch.arange(0, length, device="cpu").unsqueeze(1).float()
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") * -(math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device="cpu")
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) times -> (N, dim) float32 sinusoid laid out ``[cos | sin]`` (GLIDE/DiT order); t is used as
    given (SiT passes t in [0, 1], DiT the integer diffusion step)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """(N,) times -> (N, D): sinusoid (256) -> Linear -> SiLU -> Linear (keys ``mlp.0``, ``mlp.2``).

    ``cast_to_input_dtype`` reproduces SiT's ``.to(t.dtype)`` on the sinusoid; DiT has no cast."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, cast_to_input_dtype: bool = False) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_size = frequency_size
        self.cast_to_input_dtype = cast_to_input_dtype

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = timestep_frequencies(t, self.frequency_size)
        if self.cast_to_input_dtype:
            f = f.to(t.dtype)
        # Reduced-precision weights (bf16 / fp16 fast path): run the MLP in its own dtype. A no-op in fp32.
        return self.mlp(f.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """(N,) labels -> (N, D). Row ``num_classes`` of ``embedding_table`` is the null (unconditional) class;
    in training mode labels are replaced by it with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop is not None:
            labels = torch.where(force_drop.bool(), self.num_classes, labels)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention, (B, N, D) -> (B, N, D), qkv rows laid out [q | k | v] with heads
    contiguous. Runs :func:`models.layers.attention.attend`: SDPA unless the process is in ``exact`` mode
    (``TOKSERVE_ATTENTION``) or ``fused`` is off; then the explicit ``softmax((q * d**-0.5) @ k^T) @ v`` of the
    official fp32 path runs (bit-identical to it; SDPA agrees to ~1e-6)."""

    def __init__(self, dim: int, num_heads: int, fused: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = attend(q, k, v, scale=self.scale, fused=self.fused)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), shift/scale (B, D) -> x * (1 + scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    """adaLN-Zero transformer block: (B, N, D), c (B, D) -> (B, N, D). The modulation is chunked as
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; affine-free LayerNorms (eps 1e-6);
    GELU(tanh) MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """(B, N, D), c (B, D) -> (B, N, out): adaLN (chunks shift, scale) over an affine-free LayerNorm, then
    a Linear."""

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TokenDiffusionTransformer(nn.Module):
    """The backbone shared by SiT and DiT: ``forward(x (B, L, C), t (B,), y (B,)) -> (B, L, C_out)``."""

    config_class: ClassVar[type[GeneratorConfig]] = GeneratorConfig
    CAST_TIME_EMBEDDING: ClassVar[bool] = False

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = nn.Linear(config.token_dim, D)
        self.t_embedder = TimestepEmbedder(D, cast_to_input_dtype=self.CAST_TIME_EMBEDDING)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, D), requires_grad=False)
        self.blocks = nn.ModuleList(Block(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(D, config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The published init: xavier-uniform Linears with zero bias, N(0, 0.02) label table and timestep
        MLP, zeroed adaLN modulations and output layer (so a fresh model outputs zeros), sin-cos pos_embed."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_1d(self.config.num_tokens, self.config.hidden_size).unsqueeze(0))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def set_fused_attention(self, fused: bool) -> None:
        """Use SDPA (default) or the explicit fp32 attention of the official code in every block."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused = fused

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, C) latents, t (B,) times, y (B,) int64 labels (``num_classes`` = null) -> (B, L, C_out).
        ``force_drop`` (B,) bool replaces labels by the null class (training-time guidance dropout)."""
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, force_drop)
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c)


# ----------------------------------------------------------------------------------------------- DiT


@dataclass(frozen=True)
class DiTConfig(GeneratorConfig):
    """DiT over 1-D tokens: predicts [eps | variance interpolation] (``learn_sigma``) for the integer
    diffusion step t in [0, 1000). ``noise_schedule`` is the training beta schedule."""

    family: ClassVar[str] = "dit"

    learn_sigma: bool = True
    sampler: str = "ddpm"
    steps: int = 250
    cfg_scale: float = 1.75
    noise_schedule: str = "cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule {self.noise_schedule!r} is not one of {NOISE_SCHEDULES}")

    @staticmethod
    def matches_official(d: dict[str, Any]) -> bool:
        """A published DiT ``config.json``: transformer sizes and a ``learn_sigma`` field (true or false), no
        SiT-only keys. The published SiT configs have no ``learn_sigma`` (FORMATS.md 1.3), so a config that
        states it without any SiT key is a DiT's, never silently a SiT's."""
        return {"hidden_size", "depth", "num_heads", "in_channels", "input_size"} <= set(d) and (
            "learn_sigma" in d) and not SIT_ONLY_FIELDS & set(d)

    @classmethod
    def from_official(cls, d: dict[str, Any]) -> DiTConfig:
        """Translate a published DiT ``config.json``. ``learn_sigma=false`` (a fixed-variance DiT) is refused:
        the DDPM sampler here implements the learned-range variance of the published DiTs only."""
        if not d.get("learn_sigma", True):
            raise ValueError("official DiT config: learn_sigma=false (fixed-variance DiT, output = eps only) is not "
                             "supported; the DDPM sampler needs the learned-range variance (learn_sigma=true)")
        return cls(**cls._official_fields(d), learn_sigma=True)


@register_model_class
class DiT(TokenDiffusionTransformer):
    """DiT-XL/1 style generator over (L, C) tokens; output (B, L, 2C) = [eps | v] when ``learn_sigma``."""

    config_class = DiTConfig
    CAST_TIME_EMBEDDING = False


def _dit(**kw: Any) -> DiTConfig:
    return DiTConfig(**kw)


_XL = {"hidden_size": 1152, "depth": 28, "num_heads": 16}
_TINY = {"hidden_size": 64, "depth": 2, "num_heads": 4}
_SMALL = {"hidden_size": 384, "depth": 6, "num_heads": 6}
_SHAPES = {"64x32": (64, 32), "32x64": (32, 64)}
_TINY_TOKENIZERS = {"64x32": "softvq-tiny-64"}


def _register_dit() -> None:
    for shape, (L, C) in _SHAPES.items():
        register_config(f"dit-xl-{shape}", DiT, partial(_dit, num_tokens=L, token_dim=C, **_XL),
                        f"DiT-XL/1 over {L} tokens x {C} dims (675 M params)")
        register_config(f"dit-s-{shape}", DiT,
                        partial(_dit, num_tokens=L, token_dim=C, steps=50, tokenizer=f"softvq-s-{L}", **_SMALL),
                        f"small DiT for the CPU over {L}x{C} tokens")
        register_config(f"dit-tiny-{shape}", DiT,
                        partial(_dit, num_tokens=L, token_dim=C, steps=10, tokenizer=_TINY_TOKENIZERS.get(shape, ""),
                                **_TINY),
                        f"tiny DiT for tests over {L}x{C} tokens")
    for tok, (L, C) in {"softvq-l-64": (64, 32), "softvq-l-32": (32, 64)}.items():
        register_config(f"dit-xl_{tok}", DiT, partial(_dit, num_tokens=L, token_dim=C, tokenizer=tok, **_XL),
                        f"published SoftVQVAE/dit-xl_{tok} (DiT-XL/1 on {tok} tokens)")


_register_dit()

