"""SiT over 1-D tokens (velocity prediction, time t in [0, 1] with 1 = noise), and its named configurations.

Same backbone and keys as DiT (:mod:`models.dit`, imported here so ``import models`` registers both
families): ``pos_embed``, ``x_embedder``, ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``,
``blocks.{i}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}``, ``final_layer.{linear,
adaLN_modulation.1}``. SiT-XL/1 on 64 x 32 tokens has 292 tensors and 2,699,707,520 fp32 bytes, as the
published ``SoftVQVAE/sit-xl_softvq-*`` files.

    >>> import models
    >>> sit = models.create_model("sit-tiny-64x32")
    >>> v = sit(torch.randn(2, 64, 32), torch.rand(2), torch.tensor([207, 1000]))   # (2, 64, 32)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from models.dit import SIT_ONLY_FIELDS, DiT, DiTConfig, GeneratorConfig, TokenDiffusionTransformer
from models.registry import register_config, register_model_class
from models.sampling.flow import PATH_TYPES

__all__ = ["DiT", "DiTConfig", "GeneratorConfig", "SiT", "SiTConfig", "TokenDiffusionTransformer"]


# The published recipe (README: --mode sde --cfg-scale 1.75 --path-type cosine --num-steps 250 --guidance-high 0.7)
PUBLISHED_SAMPLING = {"sampler": "sde", "steps": 250, "cfg_scale": 1.75, "guidance_low": 0.0,
                      "guidance_high": 0.7, "path_type": "cosine"}


@dataclass(frozen=True)
class SiTConfig(GeneratorConfig):
    """SiT over 1-D tokens. Sampling defaults of the published models are the SoftVQ README recipe
    (SDE, 250 steps, cfg 1.75, guidance interval [0, 0.7], cosine path); the path type the released
    weights were trained with is not documented (FORMATS.md 1.5)."""

    family: ClassVar[str] = "sit"

    @staticmethod
    def matches_official(d: dict[str, Any]) -> bool:
        """A published SiT ``config.json`` (``vae_1d`` SiT: transformer sizes and no ``learn_sigma``, or
        one of the SiT-only keys such as ``path_type`` / ``use_cfg``)."""
        if not {"hidden_size", "depth", "num_heads", "in_channels", "input_size"} <= set(d):
            return False
        return bool(SIT_ONLY_FIELDS & set(d)) or "learn_sigma" not in d

    @classmethod
    def from_official(cls, d: dict[str, Any]) -> SiTConfig:
        """Translate the HF ``config.json``; sampling defaults are the README recipe, ``tokenizer`` is unknown
        from the file (empty).

        ``path_type`` "linear" / "cosine" (the interpolants the SDE sampler implements) becomes the default
        path; the published "edm" is an unused constructor default of the official SiT (FORMATS.md 1.3) and
        leaves the recipe's path; any other value is refused. ``decoder_hidden_size`` must equal
        ``hidden_size`` and ``use_cfg`` must be true (the only layouts implemented).
        """
        fields = cls._official_fields(d)
        if int(d.get("decoder_hidden_size", fields["hidden_size"])) != fields["hidden_size"]:
            raise ValueError(f"official SiT config: decoder_hidden_size={d['decoder_hidden_size']!r} != hidden_size "
                             f"{fields['hidden_size']} is not supported")
        if not d.get("use_cfg", True):
            raise ValueError("official SiT config: use_cfg=false is not supported (the null-class row and guidance "
                             "are always built)")
        sampling = dict(PUBLISHED_SAMPLING)
        path = d.get("path_type", "edm")
        if path in PATH_TYPES:
            sampling["path_type"] = path
        elif path != "edm":
            raise ValueError(f"official SiT config: path_type={path!r} is not supported; the samplers implement "
                             f"{PATH_TYPES} ('edm' is the published, unused constructor default)")
        return cls(**fields, learn_sigma=bool(d.get("learn_sigma", False)), **sampling)


@register_model_class
class SiT(TokenDiffusionTransformer):
    """SiT-XL/1 style generator over (L, C) tokens: ``forward(x (B, L, C), t (B,) in [0, 1], y (B,))``
    returns the velocity (B, L, C) (or (B, L, 2C) with ``learn_sigma``; samplers read the first C)."""

    config_class = SiTConfig
    CAST_TIME_EMBEDDING = True


def _sit(**kw: Any) -> SiTConfig:
    return SiTConfig(**kw)


SIZES = {
    "xl": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
    "l": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "b": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "s": {"hidden_size": 384, "depth": 6, "num_heads": 6},
    "tiny": {"hidden_size": 64, "depth": 2, "num_heads": 4},
}
SHAPES = {"64x32": (64, 32), "32x64": (32, 64)}
# CPU-sized models trained here with the linear interpolant.
SMALL_SAMPLING = {"sampler": "sde", "steps": 50, "cfg_scale": 1.75, "guidance_low": 0.0,
                  "guidance_high": 0.7, "path_type": "linear"}
# Test-sized tokenizers registered by models.softvq, per token shape.
TINY_TOKENIZERS = {"64x32": "softvq-tiny-64"}
# SoftVQ tokenizer -> (L, C) of its tokens, for the published SiT-XL repos.
PUBLISHED_TOKENIZERS = {
    "softvq-l-64": (64, 32), "softvq-bl-64": (64, 32), "softvq-b-64": (64, 32),
    "softvq-l-32": (32, 64), "softvq-bl-32": (32, 64), "softvq-b-32": (32, 64),
    "softvq-bl-64-512": (64, 32), "softvq-l-32-512": (32, 64),
}


def _register_sit() -> None:
    for shape, (L, C) in SHAPES.items():
        for size in ("xl", "l", "b"):
            register_config(f"sit-{size}-{shape}", SiT,
                            partial(_sit, num_tokens=L, token_dim=C, **SIZES[size], **PUBLISHED_SAMPLING),
                            f"SiT-{size.upper()}/1 over {L} tokens x {C} dims")
        register_config(f"sit-s-{shape}", SiT,
                        partial(_sit, num_tokens=L, token_dim=C, tokenizer=f"softvq-s-{L}", **SIZES["s"],
                                **SMALL_SAMPLING),
                        f"small SiT (CPU, shipped default) over {L}x{C} tokens of softvq-s-{L}")
        register_config(f"sit-tiny-{shape}", SiT,
                        partial(_sit, num_tokens=L, token_dim=C, tokenizer=TINY_TOKENIZERS.get(shape, ""),
                                **SIZES["tiny"], **{**SMALL_SAMPLING, "steps": 10}),
                        f"tiny SiT for tests over {L}x{C} tokens")
    for tok, (L, C) in PUBLISHED_TOKENIZERS.items():
        register_config(f"sit-xl_{tok}", SiT,
                        partial(_sit, num_tokens=L, token_dim=C, tokenizer=tok, **SIZES["xl"], **PUBLISHED_SAMPLING),
                        f"published SoftVQVAE/sit-xl_{tok} (SiT-XL/1 on {tok} tokens)")


_register_sit()
