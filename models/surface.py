"""The one model surface every family implements, and what the server reads instead of class names.

* A **tokenizer** (:class:`Tokenizer`) turns images into tokens and back, with one meaning everywhere:
  ``encode(images (B, 3, H, W) float in [-1, 1]) -> tokens`` and ``decode(tokens) -> images (B, 3, H, W)``,
  unclamped (roughly [-1, 1]). Tokens are float32 latents (B, L, D) for a *continuous* tokenizer (SoftVQ, TAEF2,
  KL-16) and int64 codes (B, *code shape) for a *discrete* one (CODA, ImageFolder / XQ-GAN SC, XQ-GAN CNN).
  Each carries one :class:`TokenSpec`, computed from its config alone (:func:`token_spec_of` needs no weights).
  Family-internal halves have their own names (``decode_fhat``, ``decode_latents``, ``decode_grid`` ...).
* A **generator** (:class:`Generator`) is a network plus a step sampler registered for its ``family``
  (:func:`models.sampling.register_sampler`). Its config derives from :class:`GeneratorConfigBase`: the
  conditioning fields and sampling defaults every family shares, and :meth:`GeneratorConfigBase.sample_spec`,
  the tokens it makes (which its tokenizer must decode).

    >>> spec = token_spec_of(models.get_config("coda-taef2-64"))
    >>> spec.kind, spec.shape, spec.dtype, spec.code_structure.codebook_size
    ('discrete', (130,), 'int64', 4096)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

TokenKind = Literal["continuous", "discrete"]
PREPROCESS = "center-crop"  # every tokenizer: resize the short side, center-crop, scale to [-1, 1]


@dataclass(frozen=True)
class CodeStructure:
    """How one image's int64 codes are laid out (discrete tokenizers, and the generators of their codes).

    ``axes`` name the axes of ``shape``: ``("position",)`` (CODA), ``("branch", "position")`` (ImageFolder),
    ``("position", "level", "group")`` (XQ-GAN CNN). Positions run over ``scales`` coarse to fine, scale ``p``
    holding ``p * p`` row-major codes (multi-scale), or over a row-major ``grid`` (h, w). Values lie in
    ``[0, codebook_size)``; where ``droppable``, ``-1`` marks a scale / level dropped by quantizer dropout (it
    decodes to zero). ``code_dim`` is the width of one code vector of one branch / group; ``latent_shape`` the
    quantized map (C, s, s) the decoder reads, when it has one; ``quantizer`` names the quantizer kind.
    """

    axes: tuple[str, ...]
    shape: tuple[int, ...]
    codebook_size: int
    code_dim: int
    layout: str
    scales: tuple[int, ...] = ()
    grid: tuple[int, int] | None = None
    latent_shape: tuple[int, ...] | None = None
    quantizer: str = ""
    droppable: bool = False

    def __post_init__(self) -> None:
        if len(self.axes) != len(self.shape) or "position" not in self.axes:
            raise ValueError(f"axes {self.axes} must name every axis of shape {self.shape}, one being 'position'")
        if self.scales and sum(p * p for p in self.scales) != self.size("position"):
            raise ValueError(f"scales {self.scales} hold {sum(p * p for p in self.scales)} positions, "
                             f"shape has {self.size('position')}")

    def size(self, axis: str) -> int:
        """Length of the named axis (1 when the layout has no such axis)."""
        return self.shape[self.axes.index(axis)] if axis in self.axes else 1

    @property
    def branches(self) -> int:
        return self.size("branch")

    @property
    def groups(self) -> int:
        """Independent codebooks side by side: branches (ImageFolder) or channel groups (XQ-GAN CNN)."""
        return self.size("branch") * self.size("group")

    @property
    def group_axis(self) -> int:
        """Index (in a batch of codes (B, *shape)) of the branch / group axis; -1 when there is none."""
        for name in ("branch", "group"):
            if name in self.axes:
                return 1 + self.axes.index(name)
        return -1

    @property
    def num_codes(self) -> int:
        return math.prod(self.shape)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start position of each scale along the position axis (multi-scale layouts)."""
        sizes = [p * p for p in self.scales]
        return tuple(sum(sizes[:i]) for i in range(len(sizes)))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (``code_structure`` of ``/v1/models``)."""
        out: dict[str, Any] = {
            "axes": list(self.axes), "shape": list(self.shape), "dtype": "int64",
            "codebook_size": self.codebook_size, "code_dim": self.code_dim, "branches": self.branches,
            "scales": list(self.scales), "layout": self.layout,
        }
        if self.scales:
            out["offsets"] = list(self.offsets)
        if self.grid is not None:
            out["grid"] = list(self.grid)
        if self.latent_shape is not None:
            out["latent_shape"] = list(self.latent_shape)
        for axis in ("level", "group"):
            if axis in self.axes:
                out[f"{axis}s"] = self.size(axis)
        if self.quantizer:
            out["quantizer"] = self.quantizer
        if self.droppable:
            out["dropped"] = -1
        return out


@dataclass(frozen=True)
class TokenSpec:
    """What one image's tokens are, read from a tokenizer's config (no weights).

    ``shape`` / ``dtype``: one image's tokens, (L, D) ``float32`` latents or the code shape ``int64``.
    ``image_size``: the square input and output side. ``preprocess``: how images reach [-1, 1]
    (:mod:`models.preprocess`). ``latent_mean`` / ``latent_std``: generators model
    ``(tokens - mean) / std`` (continuous only; 0 / 1 when unmeasured). ``license`` of the weights ("" unknown).
    """

    kind: TokenKind
    shape: tuple[int, ...]
    dtype: str
    image_size: int
    code_structure: CodeStructure | None = None
    preprocess: str = PREPROCESS
    latent_mean: float = 0.0
    latent_std: float = 1.0
    license: str = ""

    def __post_init__(self) -> None:
        want = "int64" if self.kind == "discrete" else "float32"
        if self.dtype != want or (self.code_structure is None) != (self.kind == "continuous"):
            raise ValueError(f"a {self.kind} TokenSpec has {want} tokens and "
                             f"{'a' if self.kind == 'discrete' else 'no'} code structure")
        if self.code_structure is not None and self.code_structure.shape != self.shape:
            raise ValueError(f"code structure shape {self.code_structure.shape} != token shape {self.shape}")

    @property
    def discrete(self) -> bool:
        return self.kind == "discrete"

    @property
    def codebook_size(self) -> int | None:
        return None if self.code_structure is None else self.code_structure.codebook_size

    @classmethod
    def continuous(cls, config: Any, license: str = "") -> TokenSpec:
        """The spec of a continuous tokenizer config with ``num_tokens``, ``token_dim``, ``image_size``,
        ``vq_mean`` and ``vq_std``."""
        return cls(kind="continuous", shape=(int(config.num_tokens), int(config.token_dim)), dtype="float32",
                   image_size=int(config.image_size), latent_mean=float(config.vq_mean),
                   latent_std=float(config.vq_std), license=license)

    @classmethod
    def discrete_codes(cls, structure: CodeStructure, image_size: int, license: str = "") -> TokenSpec:
        return cls(kind="discrete", shape=structure.shape, dtype="int64", image_size=int(image_size),
                   code_structure=structure, license=license)


@runtime_checkable
class Tokenizer(Protocol):
    """Every tokenizer family. ``encode``: images (B, 3, H, W) float in [-1, 1] -> tokens (B, *token_spec.shape)
    of ``token_spec.dtype``; ``decode``: such tokens -> images (B, 3, H, W) float, unclamped."""

    config: Any

    @classmethod
    def token_spec_for(cls, config: Any) -> TokenSpec: ...

    @property
    def token_spec(self) -> TokenSpec: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor: ...


class TokenizerSurface:
    """Mixed into tokenizer modules: :attr:`token_spec` (and the handy ``image_size`` / ``token_shape``) from
    the class's :meth:`token_spec_for` of its own config."""

    config: Any

    @classmethod
    def token_spec_for(cls, config: Any) -> TokenSpec:
        raise NotImplementedError(f"{cls.__name__} must define token_spec_for(config)")

    @property
    def token_spec(self) -> TokenSpec:
        return type(self).token_spec_for(self.config)

    @property
    def image_size(self) -> int:
        return self.token_spec.image_size

    @property
    def token_shape(self) -> tuple[int, ...]:
        """One image's tokens: (L, D) float32 latents, or the int64 code shape."""
        return self.token_spec.shape


class ContinuousTokenizerSurface(TokenizerSurface):
    """Continuous tokenizers: configs with ``num_tokens``, ``token_dim``, ``image_size``, ``vq_mean``,
    ``vq_std`` (and optionally ``license``); tokens (B, L, D) float32."""

    kind: ClassVar[TokenKind] = "continuous"

    @classmethod
    def token_spec_for(cls, config: Any) -> TokenSpec:
        return TokenSpec.continuous(config, license=str(getattr(config, "license", "")))


class DiscreteTokenizerSurface(TokenizerSurface):
    """Discrete tokenizers: the class defines :meth:`code_structure_for` (from the config alone) and
    ``decode(codes (B, *code shape) int64) -> images``; configs have ``image_size`` (and optionally
    ``license``)."""

    kind: ClassVar[TokenKind] = "discrete"

    @classmethod
    def code_structure_for(cls, config: Any) -> CodeStructure:
        raise NotImplementedError(f"{cls.__name__} must define code_structure_for(config)")

    @classmethod
    def token_spec_for(cls, config: Any) -> TokenSpec:
        return TokenSpec.discrete_codes(cls.code_structure_for(config), config.image_size,
                                        license=str(getattr(config, "license", "")))

    @property
    def code_structure(self) -> CodeStructure:
        return type(self).code_structure_for(self.config)

    @property
    def code_shape(self) -> tuple[int, ...]:
        """One image's codes (int64)."""
        return self.code_structure.shape


# ------------------------------------------------------------------------------------------------ generators


@dataclass(frozen=True)
class SampleSpec:
    """What one generated sample is: tokens of ``shape`` and ``dtype`` (``float32`` normalised latents, or
    ``int64`` codes of ``codebook_size`` values), for the tokenizer the generator is paired with."""

    shape: tuple[int, ...]
    dtype: str
    codebook_size: int | None = None

    def fits(self, tokens: TokenSpec) -> str | None:
        """Why a tokenizer of spec ``tokens`` cannot decode these samples, or None when it can."""
        if tokens.shape != self.shape or tokens.dtype != self.dtype:
            return f"makes {self.shape} {self.dtype} tokens, the tokenizer decodes {tokens.shape} {tokens.dtype}"
        if self.codebook_size is not None and self.codebook_size != tokens.codebook_size:
            return f"samples codes of {self.codebook_size} values, the tokenizer's codebook has {tokens.codebook_size}"
        return None


@dataclass(frozen=True)
class GeneratorConfigBase:
    """The fields every class-conditional generator config shares (SiT, DiT, MAR, MaskGIT, VAR, and any new
    family): conditioning, the tokenizer it was trained on, and the sampling defaults a request may override.

    ``num_classes`` is also the null (unconditional) label. ``trained_classes`` lists the ImageNet-1k ids the
    weights know (empty: all). ``tokenizer`` names the paired tokenizer; ``tokenizer_sha256`` is the sha256 of
    the weights it was trained on ("" unknown; the server pairs by it). Guidance with ``cfg_scale`` applies
    while a row's progress lies in [``guidance_low``, ``guidance_high``] (each family defines progress).
    Subclasses set the ``family`` (the key of its registered sampler) and define :attr:`sampler`,
    :attr:`steps` and :meth:`sample_spec`.
    """

    family: ClassVar[str] = ""

    num_classes: int = 1000
    tokenizer: str = ""
    tokenizer_sha256: str = ""
    trained_classes: tuple[int, ...] = ()
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0

    def check_base(self) -> list[str]:
        """The problems of the shared fields (empty when none)."""
        problems = []
        if not self.family:
            problems.append(f"{type(self).__name__} needs a family")
        if self.num_classes < 1:
            problems.append("num_classes must be >= 1")
        if any(not 0 <= c < self.num_classes for c in self.trained_classes):
            problems.append(f"trained_classes must lie in [0, {self.num_classes})")
        if not 0.0 <= self.guidance_low <= self.guidance_high <= 1.0:
            problems.append("need 0 <= guidance_low <= guidance_high <= 1")
        return problems

    @property
    def null_class(self) -> int:
        """The label of the unconditional embedding (one past the classes)."""
        return self.num_classes

    @property
    def classes(self) -> tuple[int, ...]:
        """The class ids a server offers: ``trained_classes``, or all of them."""
        return tuple(self.trained_classes) or tuple(range(self.num_classes))

    @property
    def sampler(self) -> str:
        """The default step sampler (one of the family's registered names)."""
        raise NotImplementedError

    @property
    def steps(self) -> int:
        """The default number of sampler steps."""
        raise NotImplementedError

    @property
    def path_type(self) -> str:
        """The interpolant of flow samplers; "linear" for families that have none."""
        return "linear"

    def sample_spec(self) -> SampleSpec:
        """The tokens one sample is."""
        raise NotImplementedError

    def sampling_extras(self) -> dict[str, Any]:
        """Family-specific sampling defaults shown in ``/v1/models`` (informational)."""
        return {}

    def sampling_defaults(self) -> dict[str, Any]:
        """Every sampling default a request may leave out, JSON-ready (``defaults`` of ``/v1/models``)."""
        return {"sampler": self.sampler, "steps": self.steps, "cfg_scale": self.cfg_scale,
                "guidance_interval": [self.guidance_low, self.guidance_high], "path_type": self.path_type,
                **self.sampling_extras()}


@runtime_checkable
class Generator(Protocol):
    """Every generator family: a module with a :class:`GeneratorConfigBase` config whose ``family`` has a
    registered step sampler. What the sampler calls (``model_fn(x, t, y)`` or the module's own methods) is the
    sampler family's business (:class:`models.sampling.SamplerFamily`)."""

    config: GeneratorConfigBase


# ------------------------------------------------------------------------------------------------ lookups


ModelKind = Literal["tokenizer", "generator"]


@dataclass(frozen=True)
class Surface:
    """What a config is, for a server: a tokenizer with its :class:`TokenSpec`, or a generator of a family
    with the :class:`SampleSpec` it makes."""

    kind: ModelKind
    family: str
    token_spec: TokenSpec | None = None
    sample_spec: SampleSpec | None = None


def token_spec_of(config: Any) -> TokenSpec:
    """The :class:`TokenSpec` of a tokenizer config (from its registered class; no weights)."""
    from models.registry import class_for_config

    cls = class_for_config(config)
    if not issubclass(cls, TokenizerSurface):
        raise TypeError(f"{cls.__name__} is not a tokenizer")
    return cls.token_spec_for(config)


def surface_of(config: Any) -> Surface:
    """Classify a registered config: a generator (its config derives from :class:`GeneratorConfigBase`) or a
    tokenizer (its class implements :class:`TokenizerSurface`); TypeError otherwise."""
    from models.registry import class_for_config

    if isinstance(config, GeneratorConfigBase):
        return Surface(kind="generator", family=config.family, sample_spec=config.sample_spec())
    cls = class_for_config(config)
    if issubclass(cls, TokenizerSurface):
        return Surface(kind="tokenizer", family=family_name(cls), token_spec=cls.token_spec_for(config))
    raise TypeError(f"{cls.__name__} is neither a tokenizer nor a generator")


def family_name(cls: type) -> str:
    """A tokenizer class's family: its config class's name, lower case, without ``config``
    (``SoftVQConfig`` -> ``softvq``)."""
    return cls.config_class.__name__.lower().removesuffix("config")  # type: ignore[attr-defined]
