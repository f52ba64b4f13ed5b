"""The XQ-GAN training configuration: a TOML file that names each choice of the menu.

    [model]          backbone = "v" | "sc", name = a registered configuration, init_from, overrides
    [quantizer]      kind = "vq" | "lfq" | "bsq" | "msrq", groups (P, product), levels (Q, residual), ...
    [alignment]      kind = "none" | "contrastive" (frozen EfficientNet-Lite0 features, CLIP loss)
    [discriminator]  kind = "none" | "patchgan" | "stylegan" | "dino", loss = "hinge" | "non-saturating" | ...
    [finetune]       encoder / decoder = "full" | "lora" | "frozen", lora_rank, lora_targets
    [loss]           reconstruction and perceptual weights
    [data] [optim] [run]   the fields of training.config.DataConfig / OptimConfig / RunConfig

Examples: ``configs/xqgan/*.toml``. :func:`load_config` parses and checks everything that needs no model
(unknown sections or keys, with a suggestion; types; unknown choices; choices that contradict each other), with
the pydantic models and messages of :mod:`training.config`;
:func:`check_model` then builds the chosen model on the meta device (no memory, no weights) and checks what
depends on it: the registry name and its pipeline, the quantizer fields, the alignment group, the image size
a discriminator needs, the LoRA targets. Every problem raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import ConfigDict, Field, field_validator, model_validator

from training.config import (
    ConfigError,
    ConfigModel,
    DataConfig,
    OptimConfig,
    ReconLoss,
    RunConfig,
    read_document,
    validate,
)
from training.xqgan.discriminators import DISCRIMINATORS
from training.xqgan.finetune import DEFAULT_LORA_TARGETS, FinetuneConfig
from training.xqgan.losses import GAN_LOSSES

Backbone = Literal["v", "sc"]
QuantizerKind = Literal["vq", "lfq", "bsq", "msrq"]
Alignment = Literal["none", "contrastive"]
AlignEncoder = Literal["efficientnet-lite0"]
BACKBONES: tuple[str, ...] = get_args(Backbone)
QUANTIZER_KINDS: tuple[str, ...] = get_args(QuantizerKind)
ALIGNMENTS: tuple[str, ...] = get_args(Alignment)
ALIGN_ENCODERS: tuple[str, ...] = get_args(AlignEncoder)
RECON_LOSSES: tuple[str, ...] = get_args(ReconLoss)
# [quantizer] key -> the model config field it sets
QUANTIZER_FIELDS: dict[str, str] = {
    "kind": "quantizer",
    "groups": "num_groups",
    "levels": "num_levels",
    "codebook_size": "codebook_size",
    "dim": "codebook_dim",
    "dropout": "quantizer_dropout",
    "beta": "beta",
    "entropy_weight": "entropy_weight",
    "cosine": "cosine",
}


def _choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    """A choice from a menu known only at run time (the registered discriminators and GAN losses)."""
    if value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1)
        raise ConfigError(
            f"{where} = {value!r} is not a known choice; choose from {list(choices)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )


class Section(ConfigModel):
    """A table of the TOML file: frozen once read."""

    model_config = ConfigDict(frozen=True)


class ModelSection(Section):
    """Which tokenizer: ``backbone`` ``v`` (the CNN of :mod:`models.xqgan_cnn`) or ``sc`` (the ViT with
    learnable query tokens, e.g. ``imagefolder-tiny-64``); ``name`` a registered configuration;
    ``init_from`` a serving folder to fine-tune; ``overrides`` other fields of the model's config."""

    backbone: Backbone = "v"
    name: str = "xqgan-v-tiny-64"
    init_from: str = ""
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _named_or_folder(self) -> ModelSection:
        if not self.name and not self.init_from:
            raise ConfigError("model.name (a registered configuration) or model.init_from is required")
        return self


class QuantizerSection(Section):
    """The quantizer; an unset key keeps the named model's value. ``kind`` the base quantizer, ``groups`` P
    (product over channel groups), ``levels`` Q (residual levels per group), ``codebook_size`` V (VQ, MSRQ;
    LFQ / BSQ have 2^(dim / P)), ``dim`` the total quantized channels, ``dropout`` residual-level dropout."""

    kind: QuantizerKind | None = None
    groups: int | None = Field(None, ge=1)
    levels: int | None = Field(None, ge=1)
    codebook_size: int | None = None
    dim: int | None = Field(None, ge=1)
    dropout: float | None = None
    beta: float | None = None
    entropy_weight: float | None = None
    cosine: bool | None = None

    def overrides(self) -> dict[str, Any]:
        """The model config fields this section sets."""
        return {QUANTIZER_FIELDS[k]: v for k, v in self.model_dump().items() if v is not None}


class AlignmentSection(Section):
    """Semantic alignment: ``contrastive`` = CLIP loss between the spatial mean of quantizer group ``group``
    and the pooled features of the frozen ``encoder`` (at ``resolution`` px), ``temperature``,
    ``normalize``."""

    kind: Alignment = "none"
    encoder: AlignEncoder = "efficientnet-lite0"
    weight: float = Field(0.1, ge=0)
    temperature: float = Field(0.1, gt=0)
    normalize: bool = True
    group: int = -1
    resolution: int = 224


class DiscriminatorSection(Section):
    """Adversarial training: ``kind``, GAN ``loss``, ``weight`` (times the adaptive gradient-norm ratio when
    ``adaptive``), ``start`` step, ``lr``, ``lecam`` weight (0: off), PatchGAN ``ndf`` / ``layers`` / ``norm``
    (``ndf`` is also the StyleGAN base width), ``resolution`` of the frozen backbone (``dino``) and
    DiffAugment on its inputs (``augment``)."""

    kind: str = "none"  # none | a registered discriminator (training.xqgan.discriminators.DISCRIMINATORS)
    loss: str = "hinge"  # a GAN loss of training.xqgan.losses.GAN_LOSSES
    weight: float = Field(0.5, ge=0)
    adaptive: bool = True
    start: int = Field(0, ge=0)
    lr: float = 1e-4
    lecam: float = Field(0.0, ge=0)
    ndf: int = 64
    layers: int = 3
    norm: Literal["batch", "group"] = "batch"
    resolution: int = 224
    augment: bool = True

    @field_validator("kind")
    @classmethod
    def _known_discriminator(cls, v: str) -> str:
        _choice("discriminator.kind", v, ("none", *DISCRIMINATORS))
        return v

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        _choice("discriminator.loss", v, GAN_LOSSES)
        return v


class LossSection(Section):
    """Reconstruction (``recon`` l1 | l2 | l1+l2) and LPIPS weights; ``quantizer_weight`` multiplies the
    quantizer's own (already weighted) losses: codebook, commitment, entropy."""

    recon: ReconLoss = "l2"
    recon_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_max_images: int = 0
    quantizer_weight: float = 1.0


class XQGANTrainConfig(ConfigModel):
    """A whole XQ-GAN run (module docstring); the sections are checked against each other on construction."""

    model: ModelSection = Field(default_factory=ModelSection)
    quantizer: QuantizerSection = Field(default_factory=QuantizerSection)
    alignment: AlignmentSection = Field(default_factory=AlignmentSection)
    discriminator: DiscriminatorSection = Field(default_factory=DiscriminatorSection)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    loss: LossSection = Field(default_factory=LossSection)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=lambda: RunConfig(out_dir="runs/xqgan"))
    kind: Literal["xqgan"] = "xqgan"

    @model_validator(mode="after")
    def _consistent(self) -> XQGANTrainConfig:
        check_choices(self)
        return self

    def model_overrides(self) -> dict[str, Any]:
        """All model config fields set by the file: ``[model.overrides]`` then ``[quantizer]``."""
        return {**self.model.overrides, **self.quantizer.overrides()}


# ---------------------------------------------------------------------------------------------- parsing


def parse_config(d: dict[str, Any]) -> XQGANTrainConfig:
    """Build and check a config from a parsed TOML document (or :func:`to_dict` of one)."""
    return validate(XQGANTrainConfig, d)


def load_config(path: str | Path) -> XQGANTrainConfig:
    """Read and check a TOML config file."""
    doc = read_document(path)
    try:
        return parse_config(doc)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def check_choices(cfg: XQGANTrainConfig) -> None:
    """The checks between sections that need no model (run on construction and assignment)."""
    ft, disc = cfg.finetune, cfg.discriminator
    tuning = [p for p in ("encoder", "decoder") if getattr(ft, p) != "full"]
    if tuning and not cfg.model.init_from:
        raise ConfigError(
            f"finetune.{tuning[0]} = {getattr(ft, tuning[0])!r} fine-tunes a trained tokenizer: "
            "set model.init_from to its serving folder (or use 'full')"
        )
    if cfg.model.init_from and (cfg.model_overrides()):
        raise ConfigError(
            "model.init_from takes the architecture from the checkpoint's config.json: "
            f"remove [quantizer] / [model.overrides] ({sorted(cfg.model_overrides())})"
        )
    if ft.encoder == "frozen" and ft.decoder == "frozen" and cfg.alignment.kind == "none":
        raise ConfigError(
            "finetune.encoder and finetune.decoder are both 'frozen' and there is no alignment: "
            "only the quant convs and codebooks would train"
        )
    if cfg.alignment.kind == "contrastive" and cfg.run.batch_size < 2:
        raise ConfigError(
            "alignment.kind = 'contrastive' uses in-batch negatives: run.batch_size must be >= 2"
        )
    if cfg.alignment.kind == "contrastive" and ft.encoder == "frozen":
        raise ConfigError(
            "alignment.kind = 'contrastive' shapes the encoder's tokens, but finetune.encoder = "
            "'frozen': unfreeze it or drop the alignment"
        )
    if disc.kind == "none" and disc.lecam > 0:
        raise ConfigError("discriminator.lecam > 0 needs a discriminator (discriminator.kind)")
    if ft.lora_targets != DEFAULT_LORA_TARGETS and "lora" not in (ft.encoder, ft.decoder):
        raise ConfigError("finetune.lora_targets is set but neither part uses 'lora'")


# ---------------------------------------------------------------------------------------------- model checks


def _load_families() -> None:
    import importlib

    import models  # noqa: F401  (registers the built-in families)

    for family in ("models.xqgan_cnn", "models.imagefolder"):
        try:
            importlib.import_module(family)
        except ModuleNotFoundError as e:
            if e.name != family:
                raise


def token_groups(mcfg: Any) -> tuple[int, int]:
    """(total quantized channels, number of channel groups) of a model config of either pipeline."""
    if hasattr(mcfg, "num_branches"):  # the SC pipeline (ImageFolderConfig): one group per branch
        return int(mcfg.code_dim) * int(mcfg.num_branches), int(mcfg.num_branches)
    return int(getattr(mcfg, "codebook_dim", 0)), int(getattr(mcfg, "num_groups", 1))


def _sc_quantizer_overrides(q: QuantizerSection, base: Any) -> dict[str, Any]:
    """[quantizer] for the SC pipeline (ImageFolderConfig): groups are its branches, ``dim`` the total width,
    ``vq`` a single scale and ``msrq`` the multi-scale residual quantizer; no residual levels, no LFQ / BSQ."""
    if q.kind in ("lfq", "bsq"):
        raise ConfigError(f"quantizer.kind = {q.kind!r}: the SC pipeline ({type(base).__name__}) quantizes with "
                          "'vq' or 'msrq'; LFQ / BSQ need model.backbone = 'v'")
    if q.levels not in (None, 1):
        raise ConfigError("quantizer.levels: the SC pipeline has no residual stack; use kind = 'msrq' "
                          "(multi-scale residuals) or model.backbone = 'v'")
    if q.entropy_weight is not None:
        raise ConfigError("quantizer.entropy_weight is an LFQ / BSQ setting; the SC pipeline has none")
    out: dict[str, Any] = {}
    groups = q.groups or int(base.num_branches)
    if q.groups is not None:
        out["num_branches"] = q.groups
    if q.dim is not None:
        if q.dim % groups:
            raise ConfigError(f"quantizer.dim = {q.dim} is not divisible by {groups} groups")
        out["code_dim"] = q.dim // groups
    for key, name in (("codebook_size", "codebook_size"), ("dropout", "codebook_drop"), ("beta", "beta"),
                      ("cosine", "codebook_l2_norm")):
        if getattr(q, key) is not None:
            out[name] = getattr(q, key)
    if q.kind == "vq":
        out["scales"] = (int(base.latent_side),)
    elif q.kind == "msrq" and len(base.scales) < 2:
        raise ConfigError(f"quantizer.kind = 'msrq': {type(base).__name__} has a single scale {tuple(base.scales)}; "
                          "set model.overrides.scales = [1, 2, ..., side]")
    return out


def model_class_and_config(cfg: XQGANTrainConfig) -> tuple[type, Any]:
    """(model class, model config) that ``cfg`` describes, with its overrides applied; raises ConfigError."""
    from models.hub import read_config
    from models.registry import create_model, get_config, list_models

    _load_families()
    if cfg.model.init_from:
        folder = Path(cfg.model.init_from)
        if not (folder / "config.json").exists():
            raise ConfigError(f"model.init_from = {str(folder)!r}: no config.json there")
        return read_config(folder)
    known = list_models()
    if cfg.model.name not in known:
        hint = difflib.get_close_matches(cfg.model.name, known, n=1)
        raise ConfigError(
            f"model.name = {cfg.model.name!r} is not a registered configuration"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    base = get_config(cfg.model.name)
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(cfg.model.overrides) - fields)
    if unknown:
        raise ConfigError(f"{['model.overrides.' + u for u in unknown]}: {type(base).__name__} has no such field")
    try:
        with_model = dataclasses.replace(base, **cfg.model.overrides)
        if "num_branches" in fields:
            quant = _sc_quantizer_overrides(cfg.quantizer, with_model)
        else:
            quant = cfg.quantizer.overrides()
            missing = sorted(set(quant) - fields)
            if missing:
                from_q = {v: k for k, v in QUANTIZER_FIELDS.items()}
                raise ConfigError(f"{['quantizer.' + from_q[m] for m in missing]}: not supported by "
                                  f"{cfg.model.name!r} ({type(base).__name__})")
        overrides = {**cfg.model.overrides, **quant}
        mcfg = dataclasses.replace(base, **overrides)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {cfg.model.name!r} with {cfg.model_overrides()}: {e}") from e
    import torch

    with torch.device("meta"):  # the class, and a construction check, without memory
        cls = type(create_model(cfg.model.name, **overrides))
    return cls, mcfg


def check_model(cfg: XQGANTrainConfig) -> Any:
    """The checks that depend on the chosen model; builds it on the meta device. Returns the model config."""
    import torch

    from models.xqgan_cnn import XQGANCNN
    from training.xqgan.finetune import apply_finetune

    cls, mcfg = model_class_and_config(cfg)
    is_v = cls is XQGANCNN
    if cfg.model.backbone == "v" and not is_v:
        raise ConfigError(
            f"model.backbone = 'v' needs a CNN (XQGANCNN) configuration; {cfg.model.name!r} is a "
            f"{cls.__name__}"
        )
    if cfg.model.backbone == "sc" and is_v:
        raise ConfigError(
            f"model.backbone = 'sc' needs a ViT (SC) configuration; {cfg.model.name!r} is the CNN"
        )
    if getattr(cls, "kind", None) != "discrete":
        raise ConfigError(f"{cls.__name__} is not a discrete tokenizer (kind {getattr(cls, 'kind', None)!r})")
    size = int(getattr(mcfg, "image_size", cfg.data.image_size))
    if size != cfg.data.image_size:
        raise ConfigError(f"data.image_size = {cfg.data.image_size} but the model takes {size} px images")
    if cfg.discriminator.kind == "stylegan" and (size < 8 or size & (size - 1)):
        raise ConfigError(f"discriminator.kind = 'stylegan' needs a power-of-two image size >= 8, not {size}")
    if cfg.alignment.kind == "contrastive":
        _, groups = token_groups(mcfg)
        if not -groups <= cfg.alignment.group < groups:
            raise ConfigError(
                f"alignment.group = {cfg.alignment.group} but the quantizer has {groups} group(s)"
            )
    if "lora" in (cfg.finetune.encoder, cfg.finetune.decoder):
        with torch.device("meta"):
            model = cls(mcfg)
        try:
            apply_finetune(model, cfg.finetune)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return mcfg


def to_dict(cfg: ConfigModel) -> dict[str, Any]:
    """A JSON / TOML-ready dict of a config or a section (``parse_config(to_dict(cfg)) == cfg``); tuples become
    lists, unset (None) values are left out (TOML has no null)."""
    return cfg.model_dump(mode="json", exclude_none=True)


__all__ = [
    "ALIGNMENTS",
    "BACKBONES",
    "QUANTIZER_FIELDS",
    "QUANTIZER_KINDS",
    "AlignmentSection",
    "ConfigError",
    "DiscriminatorSection",
    "LossSection",
    "ModelSection",
    "QuantizerSection",
    "XQGANTrainConfig",
    "check_choices",
    "check_model",
    "load_config",
    "model_class_and_config",
    "parse_config",
    "to_dict",
    "token_groups",
]
