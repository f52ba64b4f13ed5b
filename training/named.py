"""The named training configurations: one explicit table, :data:`NAMED`, from a name to the function that
returns a fresh config (``python -m training configs`` lists them; ``--config NAME`` picks one).

Each function builds its config in Python from the typed models of :mod:`training.config`, so every field is
checked as the function runs; the first line of its docstring is its description. Add a configuration by
writing a function here and a row in :data:`NAMED`.
"""

from __future__ import annotations

from collections.abc import Callable

from training.config import (
    CODATrainConfig,
    ConfigError,
    DataConfig,
    GeneratorTrainConfig,
    LatentTokenizerLossConfig,
    LatentTokenizerTrainConfig,
    MaskGITTrainConfig,
    OptimConfig,
    RunConfig,
    TokenizerLossConfig,
    TokenizerTrainConfig,
    TrainConfig,
    VARTrainConfig,
)

# ---------------------------------------------------------------------------------------------- images: SoftVQ, SiT, DiT, MAR


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


def dit_tiny() -> GeneratorTrainConfig:
    """CI: dit-tiny-64x32 with the diffusion objective."""
    cfg = generator_tiny()
    cfg.model = "dit-tiny-64x32"
    cfg.run.out_dir = "runs/dit-tiny"
    return cfg


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


def mar_tiny() -> GeneratorTrainConfig:
    """CI: mar-tiny-64x32 (MAR, per-token diffusion head) on the latents of a few hundred real images."""
    cfg = generator_tiny()
    cfg.model = "mar-tiny-64x32"
    cfg.run.out_dir = "runs/mar-tiny"
    cfg.sample_steps = 4  # MAR iterations
    return cfg


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


# ---------------------------------------------------------------------------------------------- TAEF2 latents


def softvq_taef2_tiny() -> LatentTokenizerTrainConfig:
    """CI: softvq-taef2-tiny on a small feature cache (made by the test), a few dozen steps."""
    return LatentTokenizerTrainConfig(
        model="softvq-taef2-tiny",
        cache="runs/cache/tiny-ci", val_cache="runs/cache/tiny-ci", val_images=8,
        optim=OptimConfig(lr=2e-3, warmup_steps=5, weight_decay=0.0),
        run=RunConfig(out_dir="runs/softvq-taef2-tiny", steps=30, batch_size=16, log_every=5, ckpt_every=20,
                      sample_every=30, ema_decay=0.9, threads=1),
        loss=LatentTokenizerLossConfig(align_hidden=64),
        stats_images=64,
    )


def _full(model: str) -> LatentTokenizerTrainConfig:
    return LatentTokenizerTrainConfig(
        model=model,
        run=RunConfig(out_dir=f"runs/{model}", steps=10000, batch_size=64, threads=2, ema_decay=0.999,
                      log_every=20, ckpt_every=500, ckpt_every_minutes=5, sample_every=500),
        wip_dir=f"weights/wip/{model}",
    )


def softvq_taef2_32x64() -> LatentTokenizerTrainConfig:
    """softvq-taef2-32x64 (32 tokens x 64, 2,048 floats) on all 100k Tiny ImageNet train latents."""
    return _full("softvq-taef2-32x64")


def softvq_taef2_32x64_skip() -> LatentTokenizerTrainConfig:
    """softvq-taef2-32x64-skip: 32x64 with the linear pair path beside the ViTs (issue #16's bottleneck A/B)."""
    return _full("softvq-taef2-32x64-skip")


def softvq_taef2_32_skip() -> LatentTokenizerTrainConfig:
    """softvq-taef2-32-skip: 32x32 (1,024 floats) with the linear pair path beside the ViTs."""
    return _full("softvq-taef2-32-skip")


def softvq_taef2_32() -> LatentTokenizerTrainConfig:
    """softvq-taef2-32 (32 tokens x 32, 1,024 floats) on all 100k Tiny ImageNet train latents."""
    return _full("softvq-taef2-32")


# The SiT recipe of the same-budget comparison (issue #16, item 4): one architecture and schedule, trained on
# the 32 tokens of a softvq-taef2 tokenizer or on TAEF2's own 64 tokens, from the same feature cache.


def _sit(tokens: int, dim: int, tokenizer: str, tokenizer_ref: str, out: str) -> GeneratorTrainConfig:
    name = out.rsplit("/", 1)[-1]
    return GeneratorTrainConfig(
        model=f"sit-s-{tokens}x{dim}",
        model_overrides={"hidden_size": 256, "depth": 6, "num_heads": 4, "mlp_ratio": 2.5, "cfg_scale": 2.0,
                         "guidance_high": 0.7, "steps": 50, "sampler": "sde"},
        tokenizer=tokenizer,
        tokenizer_ref=tokenizer_ref,
        feature_cache="runs/cache/tiny-train",
        encode_flip=True,  # 200k latents: the 100k images and their mirrors (the grid flipped)
        repa_weight=0.5,
        repa_depth=2,
        optim=OptimConfig(lr=3e-4, warmup_steps=500, weight_decay=0.0, min_lr_ratio=0.1),
        run=RunConfig(out_dir=out, steps=30000, batch_size=64, threads=2, ema_decay=0.9995, log_every=20,
                      ckpt_every=500, ckpt_every_minutes=5, sample_every=1000),
        t_sampling="lognormal",
        class_dropout=0.1,
        sample_steps=25,
        sample_cfg=2.0,
        wip_dir=f"weights/wip/{name}",
    )


def sit_softvq_taef2() -> GeneratorTrainConfig:
    """SiT (width 256, depth 6, ~5.9 M parameters) with REPA on the 32 tokens of softvq-taef2-32x64-skip, all
    100k Tiny ImageNet train images and their mirrors (feature cache), 200 classes."""
    return _sit(32, 64, "weights/wip/softvq-taef2-32x64-skip/export", "default-tokenizer", "runs/sit-softvq-taef2")


def sit_taef2_64() -> GeneratorTrainConfig:
    """The same SiT recipe on TAEF2's own 64 tokens (the same-budget comparison's baseline)."""
    return _sit(64, 32, "weights/default/tokenizer", "default-taef2", "runs/sit-taef2-64")


# ---------------------------------------------------------------------------------------------- discrete codes


def coda_tiny() -> CODATrainConfig:
    """CI: coda-taef2-64 with 64 codes on a few dozen real images, latent space, a few steps."""
    return CODATrainConfig(
        model_overrides={"codebook_size": 64, "lora_rank": 0},
        data=DataConfig(train="tiny-val", max_images=32),
        latent_cache="runs/coda-tiny/latents",
        eval_images=16, eval_decode=8, encode_batch_size=32,
        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
        run=RunConfig(out_dir="runs/coda-tiny", steps=20, batch_size=16, log_every=5, ckpt_every=100,
                      sample_every=20, ema_decay=0.9, threads=1),
    )


def coda_taef2() -> CODATrainConfig:
    """The shipped CODA tokenizer: coda-taef2-64 with 1024 codes (130 per image over scales 1,2,3,4,6,8), no
    LoRA, quantizer trained on the frozen TAEF2 latents of 20k Tiny ImageNet train images (about 100 per
    class), one CPU thread, 15 CPU minutes after encoding."""
    return CODATrainConfig(
        model_overrides={"codebook_size": 1024, "lora_rank": 0},
        data=DataConfig(max_images=20000),
        eval_images=500, eval_decode=100,
        optim=OptimConfig(lr=2e-3, warmup_steps=100, weight_decay=0.0, min_lr_ratio=0.05),
        run=RunConfig(out_dir="runs/coda-taef2", steps=6000, max_minutes=15, budget_clock="cpu", batch_size=128,
                      threads=1, ema_decay=0.999, log_every=20, ckpt_every=500, ckpt_every_minutes=4,
                      sample_every=500),
    )


def coda_taef2_image() -> CODATrainConfig:
    """Optional short image-space phase after coda-taef2: a rank-4 LoRA added to the TAEF2 decoder, trained
    with the quantizer on pixel L1+L2, from the latent-phase export, on the cached latents of the same images
    (no augmentation), 8 CPU minutes."""
    return CODATrainConfig(
        init_from="runs/coda-taef2/export",
        model_overrides={"lora_rank": 4, "lora_targets": ["decoder"]},
        space="image",
        data=DataConfig(max_images=20000),
        eval_images=500, eval_decode=100,
        optim=OptimConfig(lr=3e-4, warmup_steps=20, weight_decay=0.0, min_lr_ratio=0.1),
        run=RunConfig(out_dir="runs/coda-taef2-image", steps=2000, max_minutes=8, budget_clock="cpu", batch_size=16,
                      threads=1, ema_decay=0.99, log_every=10, ckpt_every=200, ckpt_every_minutes=4,
                      sample_every=200),
    )


def maskgit_tiny() -> MaskGITTrainConfig:
    """CI: maskgit-tiny on the codes of the coda-tiny export (a few dozen real images)."""
    return MaskGITTrainConfig(
        model="maskgit-tiny",
        tokenizer="runs/coda-tiny/export",
        data=DataConfig(train="tiny-val", max_images=32, flip=False),
        latent_cache="runs/coda-tiny/latents",
        val_images=16, sample_steps=4, sample_classes=2, sample_per_class=2, encode_batch_size=32,
        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
        run=RunConfig(out_dir="runs/maskgit-tiny", steps=20, batch_size=16, log_every=5, ckpt_every=100,
                      sample_every=20, ema_decay=0.9, threads=1),
    )


def maskgit_taef2() -> MaskGITTrainConfig:
    """The shipped MaskGIT (``weights/default/maskgit``, served as ``default-maskgit``): width 160, depth 4,
    4 heads, MLP ratio 3 (1.5 M parameters, 3 MB fp16) on the codes that the shipped ``default-coda`` gives
    20k Tiny ImageNet train images (200 classes), one CPU thread, 60 CPU minutes."""
    return MaskGITTrainConfig(
        model="maskgit-s",
        model_overrides={"hidden_size": 160, "depth": 4, "num_heads": 4, "mlp_ratio": 3.0, "num_iter": 12},
        tokenizer="weights/default/coda",
        tokenizer_ref="default-coda",  # the served name of weights/default/coda
        data=DataConfig(max_images=20000, flip=False),
        val_images=500,
        optim=OptimConfig(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=100, min_lr_ratio=0.05),
        run=RunConfig(out_dir="runs/maskgit-taef2", steps=40000, max_minutes=60, budget_clock="cpu", batch_size=32,
                      threads=1, ema_decay=0.999, log_every=20, ckpt_every=500, ckpt_every_minutes=5,
                      sample_every=500),
    )


def var_tiny() -> VARTrainConfig:
    """CI: var-tiny-64 on the codes of an imagefolder-tiny-64 export (a few dozen real images)."""
    return VARTrainConfig(
        model="var-tiny-64",
        tokenizer="runs/imagefolder-tiny/export",
        data=DataConfig(train="tiny-val", max_images=32, flip=False),
        val_images=16, sample_classes=2, sample_per_class=2, encode_batch_size=32,
        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
        run=RunConfig(out_dir="runs/var-tiny", steps=20, batch_size=16, log_every=5, ckpt_every=100,
                      sample_every=20, ema_decay=0.9, threads=1),
    )


def var_imagefolder() -> VARTrainConfig:
    """The shipped VAR (``weights/default/var``, served as ``default-var``): var-s-64, width 128, depth 4,
    4 heads (1.5 M parameters, 3 MB fp16) on the codes that the shipped ``default-imagefolder`` gives 20k Tiny
    ImageNet train images (200 classes), one CPU thread, 35 CPU minutes."""
    return VARTrainConfig(
        model="var-s-64",
        tokenizer="weights/default/imagefolder",
        tokenizer_ref="default-imagefolder",
        data=DataConfig(max_images=20000, flip=False),
        val_images=500,
        optim=OptimConfig(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=100, min_lr_ratio=0.05),
        run=RunConfig(out_dir="runs/var-imagefolder", steps=40000, max_minutes=35, budget_clock="cpu",
                      batch_size=32, threads=1, ema_decay=0.999, log_every=20, ckpt_every=500,
                      ckpt_every_minutes=5, sample_every=500),
    )


# ---------------------------------------------------------------------------------------------- the table

NAMED: dict[str, Callable[[], TrainConfig]] = {
    "tokenizer-tiny": tokenizer_tiny,
    "tokenizer-default": tokenizer_default,
    "generator-tiny": generator_tiny,
    "dit-tiny": dit_tiny,
    "generator-default": generator_default,
    "mar-tiny": mar_tiny,
    "mar-default": mar_default,
    "softvq-taef2-tiny": softvq_taef2_tiny,
    "softvq-taef2-32x64": softvq_taef2_32x64,
    "softvq-taef2-32": softvq_taef2_32,
    "softvq-taef2-32x64-skip": softvq_taef2_32x64_skip,
    "softvq-taef2-32-skip": softvq_taef2_32_skip,
    "sit-softvq-taef2": sit_softvq_taef2,
    "sit-taef2-64": sit_taef2_64,
    "coda-tiny": coda_tiny,
    "coda-taef2": coda_taef2,
    "coda-taef2-image": coda_taef2_image,
    "maskgit-tiny": maskgit_tiny,
    "maskgit-taef2": maskgit_taef2,
    "var-tiny": var_tiny,
    "var-imagefolder": var_imagefolder,
}


def get_named(name: str) -> TrainConfig:
    """A fresh copy of the named configuration ``name``; ConfigError (with a suggestion) when unknown."""
    try:
        fn = NAMED[name]
    except KeyError:
        import difflib

        hint = difflib.get_close_matches(name, list(NAMED), n=1)
        raise ConfigError(f"unknown training config {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; known: {sorted(NAMED)}") from None
    return fn()


def summary(name: str) -> str:
    """The first line of the named configuration's docstring."""
    return (NAMED[name].__doc__ or "").strip().splitlines()[0]
