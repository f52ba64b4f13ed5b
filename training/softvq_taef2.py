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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import models
from models.softvq_taef2 import SoftVQTAEF2
from training.config import LatentTokenizerLossConfig, LatentTokenizerTrainConfig
from training.data import EpochSampler, load_images, to_float, to_uint8
from training.feature_cache import FeatureCache, open_feature_cache
from training.latents import LatentStats
from training.losses import TokenAligner, kl_from_losses
from training.metrics import psnr
from training.plots import plot_losses, save_grid
from training.progress import note
from training.trainer import Trainer, setup_run

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


__all__ = ["LatentTokenizerLossConfig", "LatentTokenizerTrainConfig", "build_model", "held_out", "train_softvq_taef2"]

