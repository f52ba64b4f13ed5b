"""Training of the SoftVQ tokenizer on the frozen TAEF2 (``models/softvq_taef2.py``), in latent space.

``python -m training softvq-taef2 --config softvq-taef2-32x64`` (:func:`train_softvq_taef2`):

1. reads a feature cache of the training split (``python -m training cache-features``,
   :mod:`training.feature_cache`): TAEF2 latents (N, 32, 8, 8) and EfficientNet-Lite0 features
   (N, 1280, g, g), all held in memory (about 1.4 GB for the 100k Tiny ImageNet images);
2. sets ``latent_shift`` / ``latent_scale`` (mean and 1 / std of the cached latents) unless fine-tuning;
3. per step, on a batch of cached latents z (each mirrored with probability 1/2 when ``flip``: the grid and
   the Lite0 features flipped left-right, close to encoding the mirrored image):

       enc = model.encode_latents(z); g_hat = model.decode_grid(enc.tokens)
       loss = w_grid * MSE(g_hat, normalised grid of z)                    (no pixels: cheap)
            + w_kl * [H(q) - H(E_x q)]                                     (SoftVQ's KL term)
            + w_align * (1 - cos(MLP(tokens), cached Lite0 features))      (representation alignment)

4. at each sample step, measures on held-out images (the validation cache and its images): the grid's
   relative MSE and the PSNR of the decoded images against the originals (uint8, rounded), logged to
   ``metrics.jsonl``, plus a reconstruction grid;
5. exports ``<out_dir>/export`` (fp16, TAEF2 weights included) with ``vq_mean`` / ``vq_std`` measured on
   the tokens of (up to ``stats_images``) training latents.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import models
from models.softvq_taef2 import SoftVQTAEF2
from training import config as C
from training.config import OptimConfig, RunConfig
from training.data import EpochSampler, load_images, to_float, to_uint8
from training.feature_cache import FeatureCache, open_feature_cache
from training.latents import LatentStats
from training.losses import TokenAligner, kl_from_losses
from training.metrics import psnr
from training.plots import plot_losses, save_grid
from training.progress import note
from training.trainer import Trainer, setup_run


@dataclass
class LatentTokenizerLossConfig:
    grid_weight: float = 1.0  # MSE on the normalised TAEF2 latent grid
    kl_weight: float = 0.01  # SoftVQ KL term H(q) - H(E_x q)
    align_weight: float = 0.1  # 1 - cos(MLP(tokens), Lite0 features); 0 disables
    align_hidden: int = 512


@dataclass
class LatentTokenizerTrainConfig:
    """Training of a ``softvq-taef2`` tokenizer from cached TAEF2 latents (module docstring)."""

    model: str = "softvq-taef2-32x64"
    model_overrides: dict[str, Any] = field(default_factory=dict)
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
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_steps=200, weight_decay=0.0,
                                                                   min_lr_ratio=0.05))
    run: RunConfig = field(default_factory=lambda: RunConfig(batch_size=64, ema_decay=0.999))
    loss: LatentTokenizerLossConfig = field(default_factory=LatentTokenizerLossConfig)
    kind: str = "softvq-taef2"


C.TRAIN_KINDS["softvq-taef2"] = LatentTokenizerTrainConfig


@C.named
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


@C.named
def softvq_taef2_32x64() -> LatentTokenizerTrainConfig:
    """softvq-taef2-32x64 (32 tokens x 64, 2,048 floats) on all 100k Tiny ImageNet train latents."""
    return _full("softvq-taef2-32x64")


@C.named
def softvq_taef2_32() -> LatentTokenizerTrainConfig:
    """softvq-taef2-32 (32 tokens x 32, 1,024 floats) on all 100k Tiny ImageNet train latents."""
    return _full("softvq-taef2-32")


# ---------------------------------------------------------------------------------------------- pieces


def build_model(cfg: LatentTokenizerTrainConfig, cache: FeatureCache) -> SoftVQTAEF2:
    if cfg.init_from:
        model = models.load_pretrained(cfg.init_from).float()
        if cfg.model_overrides:
            model.config = dataclasses.replace(model.config, **cfg.model_overrides)
        return model
    if cfg.run.resume_from and (Path(cfg.run.resume_from) / Trainer.WIP_STATE).exists():
        saved = json.loads((Path(cfg.run.resume_from) / Trainer.WIP_STATE).read_text())["model_config"]
        shift, std = float(saved["latent_shift"]), 1.0 / float(saved["latent_scale"])
    else:
        sample = torch.from_numpy(np.asarray(cache.latents[: min(len(cache), 10000)], dtype=np.float32)).double()
        shift, std = float(sample.mean()), float(sample.std())
    config = models.get_config(cfg.model, latent_shift=shift, latent_scale=1.0 / std, **cfg.model_overrides)
    return SoftVQTAEF2.with_taef2(config, cfg.taef2)


def _tensors(cache: FeatureCache, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = len(cache) if limit is None else min(limit, len(cache))
    return (torch.from_numpy(np.array(cache.latents[:n])), torch.from_numpy(np.array(cache.lite[:n])),
            torch.from_numpy(np.array(cache.labels[:n])))


@torch.no_grad()
def held_out(model: SoftVQTAEF2, latents: torch.Tensor, images: torch.Tensor | None,
             batch_size: int = 100) -> dict[str, float]:
    """Relative grid MSE on held-out latents and, with their images (uint8), mean PSNR of the decodes (dB)."""
    model.eval()
    err = ref = 0.0
    psnrs = []
    for i in range(0, len(latents), batch_size):
        z = latents[i : i + batch_size].float()
        target = model.grid_from_latents(z)
        enc = model.encode_latents(z, compute_losses=False)
        g = model.decode_grid(enc.tokens)
        err += float((g - target).pow(2).sum())
        ref += float((target - target.mean()).pow(2).sum())
        if images is not None:
            rec = to_uint8(model.vae.decode_spatial(model.latents_from_grid(g)))
            psnrs.append(psnr(rec, images[i : i + batch_size]))
    out = {"val_grid_rel_mse": err / max(ref, 1e-12)}
    if psnrs:
        out["val_psnr"] = float(torch.cat(psnrs).mean())
    return out


@torch.no_grad()
def token_stats(model: SoftVQTAEF2, latents: torch.Tensor, batch_size: int = 500) -> LatentStats:
    model.eval()
    toks = [model.encode_latents(latents[i : i + batch_size].float(), compute_losses=False).tokens
            for i in range(0, len(latents), batch_size)]
    return LatentStats.of(torch.cat(toks))


# ---------------------------------------------------------------------------------------------- loop


def train_softvq_taef2(cfg: LatentTokenizerTrainConfig) -> Path:
    run = cfg.run
    device = setup_run(run)
    cache = open_feature_cache(cfg.cache)
    note(f"feature cache {cfg.cache}: reading {min(len(cache), cfg.max_images or len(cache))} TAEF2 latents and "
         "Lite0 features into memory")
    z_all, f_all, _ = _tensors(cache, cfg.max_images)
    model = build_model(cfg, cache).to(device)
    val = open_feature_cache(cfg.val_cache)
    val_z = torch.from_numpy(np.array(val.latents[: cfg.val_images]))
    val_x = load_images(cfg.val_source, model.image_size, max_images=cfg.val_images).images
    if len(val_x) != len(val_z):
        raise ValueError(f"{cfg.val_source}: {len(val_x)} images for {len(val_z)} cached latents")

    aligner = (TokenAligner(model.config.token_dim, f_all.shape[1], cfg.loss.align_hidden).to(device)
               if cfg.loss.align_weight > 0 else None)
    extra = {"aligner": aligner} if aligner is not None else {}
    trainer = Trainer(cfg, model, run, extra=extra)
    params = [p for p in model.parameters() if p.requires_grad] + (list(aligner.parameters()) if aligner else [])
    trainer.add_optimizer("model", params, cfg.optim)
    trainer.maybe_resume()
    sampler = EpochSampler(len(z_all), run.batch_size, run.seed)
    gen = torch.Generator()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"softvq-taef2 {cfg.model}: {n_train / 1e6:.2f} M trainable parameters (TAEF2 frozen), tokens "
          f"{model.token_shape}, {len(z_all)} cached latents, shift {model.config.latent_shift:.4f} "
          f"scale {model.config.latent_scale:.4f}, from step {trainer.step}", flush=True)
    lc = cfg.loss

    def step_fn(step: int) -> dict[str, float]:
        gen.manual_seed(run.seed * 1_000_003 + step)
        idx = sampler.indices(step)
        z, f = z_all[idx].float(), f_all[idx].float()
        if cfg.flip:
            m = torch.rand(len(idx), generator=gen) < 0.5
            z = torch.where(m.view(-1, 1, 1, 1), z.flip(-1), z)
            f = torch.where(m.view(-1, 1, 1, 1), f.flip(-1), f)
        z, f = z.to(device), f.to(device)
        with trainer.autocast():
            enc = model.encode_latents(z, compute_losses=True)
            g = model.decode_grid(enc.tokens)
            grid = F.mse_loss(g.float(), model.grid_from_latents(z))
            loss = lc.grid_weight * grid
            out = {"grid_mse": float(grid.detach())}
            kl = kl_from_losses(enc.quantizer.losses)
            if kl is not None and lc.kl_weight > 0:
                loss = loss + lc.kl_weight * kl
                out["kl"] = float(kl.detach())
            if aligner is not None:
                a = aligner(enc.tokens.float(), f)
                loss = loss + lc.align_weight * a
                out["align"] = float(a.detach())
        out["loss"] = float(loss.detach())
        out["grad_norm"] = trainer.backward_step("model", loss)
        return out

    def on_sample(step: int) -> None:
        ema = trainer.export_model
        res = held_out(ema, val_z.to(device), val_x)
        trainer.log({"event": "eval", "step": step, **{k: round(v, 5) for k, v in res.items()}})
        print(f"step {step}: held-out {res}", flush=True)
        with torch.no_grad():
            k = min(8, len(val_x))
            rec = ema.vae.decode_spatial(ema.decode_latents(ema.encode_latents(val_z[:k].float().to(device),
                                                                                compute_losses=False).tokens))
            taef2 = ema.vae.decode_spatial(val_z[:k].float().to(device))
        grid = torch.cat([to_float(val_x[:k]), taef2.cpu(), rec.cpu()])
        save_grid(grid, trainer.out / "samples" / f"recon_{step:06d}.png", nrow=k, scale=2)
        plot_losses(trainer.out / "metrics.jsonl", trainer.out / "loss.png")
        if cfg.wip_dir:
            trainer.save_wip(cfg.wip_dir, skip=("vae.",))  # the frozen stem comes from TAEF2's own files

    trainer.fit(step_fn, batch_size=run.batch_size, on_sample=on_sample)
    return export(trainer, cfg, z_all[: cfg.stats_images])


def export(trainer: Trainer, cfg: LatentTokenizerTrainConfig, stats_latents: torch.Tensor) -> Path:
    model = trainer.export_model
    stats = token_stats(model, stats_latents.to(trainer.device))
    note = (f"trained by tokserve `python -m training softvq-taef2` for {trainer.step} steps "
            f"({trainer.images_seen} latents, {trainer.cpu_now / 60:.1f} CPU min)")
    model.config = dataclasses.replace(model.config, vq_mean=stats.vq_mean, vq_std=stats.vq_std,
                                       trained_on=f"{cfg.cache} (TAEF2 latents)", notes=note)
    out = models.save_pretrained(model, trainer.out / "export", dtype=getattr(torch, cfg.run.export_dtype))
    trainer.log({"event": "export", "path": str(out), "step": trainer.step, "images": trainer.images_seen,
                 "cpu_s": round(trainer.cpu_now, 1), "stats": dataclasses.asdict(stats)})
    (trainer.out / "export_stats.json").write_text(json.dumps(dataclasses.asdict(stats)) + "\n")
    return out


__all__ = ["LatentTokenizerTrainConfig", "build_model", "held_out", "train_softvq_taef2"]


# ---------------------------------------------------------------------------------------------- generators
# The SiT recipe of the same-budget comparison (issue #16, item 4): one architecture and schedule, trained on
# the 32 tokens of a softvq-taef2 tokenizer or on TAEF2's own 64 tokens, from the same feature cache.


def _sit(tokens: int, dim: int, tokenizer: str, tokenizer_ref: str, out: str) -> C.GeneratorTrainConfig:
    return C.GeneratorTrainConfig(
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
    )


@C.named
def sit_softvq_taef2() -> C.GeneratorTrainConfig:
    """SiT (width 256, depth 6, ~5.9 M parameters) with REPA on the 32 tokens of softvq-taef2-32x64, all 100k
    Tiny ImageNet train images and their mirrors (feature cache), 200 classes."""
    return _sit(32, 64, "runs/softvq-taef2-32x64/export", "default-tokenizer", "runs/sit-softvq-taef2")


@C.named
def sit_taef2_64() -> C.GeneratorTrainConfig:
    """The same SiT recipe on TAEF2's own 64 tokens (the same-budget comparison's baseline)."""
    return _sit(64, 32, "weights/default/tokenizer", "default-taef2", "runs/sit-taef2-64")
