"""CODA tokenizer training on a frozen VAE (issue #7): ``python -m training coda --config coda-taef2``
(:func:`train_coda`):

1. builds the CODA tokenizer on the real TAEF2 weights (``CODA.with_pretrained_vae``; the frozen base weights
   are rounded to fp16 first, ``vae_fp16``, so training sees the encoder the fp16 export serves);
2. encodes the training images once with the frozen encoder and caches the raw latents (B, C, s, s) under
   ``latent_cache`` (default ``runs/coda-latents``), keyed by the encoder's weights and the data selection;
   the same cache serves the MaskGIT command when its tokenizer has the same encoder;
3. sets ``latent_shift`` / ``latent_scale`` from the mean / std of those latents (``normalize_latents``);
4. ``space=latent``: trains the quantizer on cached latents,
   ``loss = latent_weight * mse(f_hat, z) + quant_weight * quant + entropy`` (the quantizer's commitment /
   codebook term and its optional entropy term, :mod:`models.quantizers.coda`);
   ``space=image`` (a short final phase, usually ``init_from`` a latent-space export): also decodes f_hat and
   adds ``image_weight * rec(x, decode(f_hat))`` (+ LPIPS), training LoRA adapters and the quantizer;
5. logs codebook usage every step (distinct codes of the batch, codes alive in the usage EMA) and, every
   ``run.sample_every`` steps, an ``eval`` record on held-out validation images: latent MSE, distinct codes
   per scale and in all, code perplexity and the PSNR of the decoded quantized latents beside the VAE's own;
6. exports ``<out_dir>/export`` (``config.json`` + fp16 safetensors holding the VAE weights too, so
   ``models.load_pretrained`` needs nothing else) with ``trained_on`` / ``notes``.

The raw-latent cache (:func:`cached_vae_latents`) is shared with MaskGIT training (:mod:`training.maskgit`),
which encodes its training images through it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import models
from models.coda import CODA
from models.quantizers.base import perplexity
from models.registry import get_config
from training.config import CODATrainConfig, DataConfig, model_field_overrides
from training.data import EpochSampler, ImageSet, load_images, to_float, to_uint8
from training.losses import reconstruction_loss
from training.metrics import psnr
from training.plots import plot_losses, save_grid
from training.progress import note, progress
from training.tokenizer import load_training_images
from training.trainer import Trainer, setup_run

DEFAULT_LATENT_CACHE = "runs/coda-latents"

# ---------------------------------------------------------------------------------------------- latent cache


def encoder_fingerprint(model: CODA) -> str:
    """Hash of every VAE tensor outside the decoder (base weights and any encoder LoRA), as float32 bytes
    (-0.0 as 0.0: the EMA's lerp turns one into the other): equal fingerprints give equal raw latents."""
    h = hashlib.sha1(model.config.vae.encode())
    for k, v in sorted(model.vae.state_dict().items()):
        if k.startswith("decoder") or not v.is_floating_point():
            continue
        h.update(k.encode())
        h.update((v.detach().float().cpu() + 0.0).contiguous().numpy().tobytes())  # + 0.0: -0.0 hashes as 0.0
    return h.hexdigest()[:16]


def data_key(d: DataConfig, source: str, max_images: int | None, flip: bool = False) -> str:
    return json.dumps([source, d.num_classes, d.classes, max_images, d.image_size, d.image_column,
                       d.label_column, flip])


@torch.no_grad()
def cached_vae_latents(model: CODA, images: ImageSet, cache_dir: str | os.PathLike[str], key: str, *,
                       batch_size: int = 64, flip: bool = False, device: torch.device | str = "cpu",
                       show_progress: bool = True) -> ImageSet:
    """Raw VAE latents (N, C, s, s) float32 (``vae.encode_spatial``: before shift / scale) and labels of
    ``images`` (mirrored copies appended when ``flip``), read from ``cache_dir`` when present, else encoded and
    written there. The file name hashes the encoder weights and ``key`` (the data selection)."""
    name = hashlib.sha1((encoder_fingerprint(model) + key).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"latents_{name}.pt"
    if path.exists():
        d = torch.load(path, weights_only=True)
        if d.get("n") == len(images) * (2 if flip else 1):
            note(f"VAE latent cache {path}: reused ({d['n']} latents), nothing to encode")
            return ImageSet(d["latents"], d["labels"])
    model.eval()
    src = torch.cat([images.images, images.images.flip(-1)]) if flip else images.images
    labels = torch.cat([images.labels, images.labels]) if flip else images.labels
    out = []
    with progress(total=len(src), desc=f"encoding VAE latents (cache {path})" if show_progress else None) as bar:
        for i in range(0, len(src), batch_size):
            out.append(model.vae.encode_spatial(to_float(src[i : i + batch_size]).to(device)).float().cpu())
            bar.update(out[-1].shape[0])
    latents = torch.cat(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"latents": latents, "labels": labels, "n": len(latents), "key": key}, tmp)
    os.replace(tmp, path)
    return ImageSet(latents, labels)


def to_quantizer_input(model: CODA, raw: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents -> the quantizer input ``(raw - latent_shift) * latent_scale`` (as encode_latents)."""
    return (raw - model.config.latent_shift) * model.config.latent_scale


@torch.no_grad()
def codes_of(model: CODA, raw: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Raw latents (N, C, s, s) -> codes (N, L) int64, exactly ``model.encode`` past the VAE encoder."""
    model.eval()
    return torch.cat([model.quantize(to_quantizer_input(model, raw[i : i + batch_size])).indices
                      for i in range(0, len(raw), batch_size)])


# ---------------------------------------------------------------------------------------------- CODA


def build_coda(cfg: CODATrainConfig) -> CODA:
    """``init_from`` a CODA folder (overrides applied; LoRA tensors the folder lacks keep their fresh init),
    else the registered config on the original VAE weights; frozen VAE weights rounded to fp16 if asked."""
    if cfg.init_from:
        src = models.load_pretrained(cfg.init_from).float()
        if not isinstance(src, CODA):
            raise ValueError(f"{cfg.init_from} is a {type(src).__name__}, not a CODA tokenizer")
        model = CODA(dataclasses.replace(src.config, **model_field_overrides(cfg.model_overrides)))
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        bad = [k for k in missing if ".lora_layer." not in k] + list(unexpected)
        if bad:
            raise ValueError(f"{cfg.init_from} does not fit the overridden config: {bad[:8]}")
    else:
        config = dataclasses.replace(get_config(cfg.model), **model_field_overrides(cfg.model_overrides))
        model = CODA.with_pretrained_vae(config, cfg.vae_weights)
    if cfg.vae_fp16:
        with torch.no_grad():
            for p in model.vae.parameters():
                if not p.requires_grad:
                    p.copy_(p.half().float())
    return model


def usage_stats(model: CODA, indices: torch.Tensor) -> dict[str, Any]:
    """Distinct codes among ``indices`` (N, L): in all, per scale, and the perplexity of their histogram."""
    V = model.config.codebook_size
    parts = model.quantizer.split_indices(indices)
    counts = torch.bincount(indices.reshape(-1), minlength=V).float()
    return {"codes_used": int((counts > 0).sum()), "codes_used_frac": round(float((counts > 0).float().mean()), 4),
            "perplexity": round(perplexity(counts), 1),
            "codes_used_per_scale": [int(torch.bincount(p.reshape(-1), minlength=V).gt(0).sum()) for p in parts]}


@torch.no_grad()
def evaluate_coda(model: CODA, raw: torch.Tensor, images: torch.Tensor, decode_n: int,
                  batch_size: int = 100) -> dict[str, Any]:
    """Held-out figures of a CODA model on raw latents (N, C, s, s) of uint8 ``images``: latent MSE (and
    relative to the latent variance), code usage and the PSNR of ``decode_latents(f_hat)`` on the first
    ``decode_n`` images."""
    model.eval()
    z = to_quantizer_input(model, raw)
    outs = [model.quantize(z[i : i + batch_size]) for i in range(0, len(z), batch_size)]
    f_hat = torch.cat([o.quantized for o in outs])
    idx = torch.cat([o.indices for o in outs])
    mse = float(F.mse_loss(f_hat, z))
    res: dict[str, Any] = {"n": len(z), "latent_mse": round(mse, 5), "latent_rel_mse": round(mse / float(z.var()), 4),
                           **usage_stats(model, idx)}
    if decode_n:
        rec = torch.cat([to_uint8(model.decode_latents(f_hat[i : i + batch_size]))
                         for i in range(0, decode_n, batch_size)])[:decode_n]
        res["psnr"] = round(float(psnr(images[:decode_n], rec).mean()), 3)
    return res


@torch.no_grad()
def vae_psnr(model: CODA, raw: torch.Tensor, images: torch.Tensor, batch_size: int = 100) -> float:
    """PSNR of the model's decoder on the unquantized latents (the VAE's own reconstruction)."""
    model.eval()
    rec = torch.cat([to_uint8(model.vae.decode_spatial(raw[i : i + batch_size])) for i in range(0, len(raw), batch_size)])
    return round(float(psnr(images, rec).mean()), 3)


def train_coda(cfg: CODATrainConfig) -> Path:
    run = cfg.run
    device = setup_run(run)
    model = build_coda(cfg)
    data = load_training_images(cfg)
    val = load_images(cfg.data.val, cfg.data.image_size, max_images=cfg.eval_images or 8)
    cache_dir = cfg.latent_cache or DEFAULT_LATENT_CACHE
    d = cfg.data
    latents = cached_vae_latents(model, data, cache_dir, data_key(d, d.train, d.max_images),
                                 batch_size=cfg.encode_batch_size, device=device)
    val_lat = cached_vae_latents(model, val, cache_dir, data_key(d, d.val, len(val)),
                                 batch_size=cfg.encode_batch_size, device=device, show_progress=False)
    raw_all = latents.images
    if cfg.normalize_latents and not cfg.init_from:
        mean, std = float(raw_all.double().mean()), float(raw_all.double().std())
        model.config = dataclasses.replace(model.config, latent_shift=mean, latent_scale=1.0 / std)
    model = model.to(device)
    encoder_trains = any(p.requires_grad for n, p in model.vae.named_parameters() if not n.startswith("decoder"))
    if encoder_trains:
        raise ValueError("LoRA on the encoder would invalidate the latent cache; use lora_targets=['decoder']")
    lpips = None
    if cfg.space == "image" and cfg.lpips_weight > 0:
        from training.perceptual import LPIPS

        lpips = LPIPS().to(device)
    if cfg.space == "latent":
        params = list(model.quantizer.parameters())  # the decoder (and any LoRA) sees no gradient here
    elif cfg.train_quantizer:
        params = model.trainable_parameters()
    else:
        model.quantizer.requires_grad_(False)
        params = [p for p in model.vae.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: image space without LoRA and with train_quantizer=false")
    trainer = Trainer(cfg, model, run)
    trainer.add_optimizer("model", params, cfg.optim)
    trainer.maybe_resume()
    base_psnr = vae_psnr(trainer.export_model, val_lat.images[: cfg.eval_decode], val.images[: cfg.eval_decode]) \
        if cfg.eval_images and cfg.eval_decode else None
    sampler = EpochSampler(len(raw_all), run.batch_size, run.seed)
    n_train = sum(p.numel() for p in params)
    print(f"coda {cfg.model} ({cfg.space} space): codebook {model.config.codebook_size}, {model.config.num_tokens} "
          f"codes/image, {n_train / 1e6:.3f} M trained parameters, {len(raw_all)} training latents, latent shift "
          f"{model.config.latent_shift:.4f} scale {model.config.latent_scale:.4f}, VAE PSNR on {cfg.eval_decode} val "
          f"images {base_psnr} dB, from step {trainer.step}", flush=True)

    def step_fn(step: int) -> dict[str, float]:
        idx = sampler.indices(step)
        z = to_quantizer_input(model, raw_all[idx].to(device))
        q = model.quantize(z)
        rec = F.mse_loss(q.quantized, z)
        loss = cfg.latent_weight * rec + cfg.quant_weight * q.losses["quant"] + q.losses["entropy"]
        out = {"latent_mse": float(rec.detach()), "quant": float(q.losses["quant"].detach()),
               "entropy": float(q.losses["entropy"].detach())}
        if cfg.space == "image":
            x = to_float(data.images[idx]).to(device)
            x_hat = model.decode_latents(q.quantized)
            img = reconstruction_loss(x, x_hat, cfg.image_recon)
            loss = loss + cfg.image_weight * img
            out["image_rec"] = float(img.detach())
            if lpips is not None:
                p = lpips(x, x_hat).mean()
                loss = loss + cfg.lpips_weight * p
                out["lpips"] = float(p.detach())
        out["grad_norm"] = trainer.backward_step("model", loss)
        out["loss"] = float(loss.detach())
        counts = torch.stack(list(q.usage.values())).sum(0)
        out["batch_codes"] = float((counts > 0).sum())
        out["alive_codes"] = float((model.quantizer.usage_ema.sum(0) > 1e-3).sum())
        return out

    done: set[int] = set()

    def on_sample(step: int) -> None:
        if step in done:  # fit() also calls it after the last step
            return
        done.add(step)
        m = trainer.export_model
        if cfg.eval_images:
            res = evaluate_coda(m, val_lat.images, val.images, cfg.eval_decode)
            res.update({"event": "eval", "step": step, "data": d.val, "vae_psnr": base_psnr})
            trainer.log(res)
            print("eval " + json.dumps(res), flush=True)
        with torch.no_grad():
            m.eval()
            rec = to_uint8(m.decode(m.encode(to_float(val.images[:8]).to(device))))
        save_grid(torch.cat([val.images[:8], rec.cpu()]), trainer.out / "samples" / f"recon_{step:06d}.png", nrow=8,
                  scale=2)
        plot_losses(trainer.out / "metrics.jsonl", trainer.out / "loss.png")

    trainer.fit(step_fn, batch_size=run.batch_size, on_sample=on_sample)
    return export_coda(trainer, cfg, len(raw_all), len(set(latents.labels.tolist())),
                       evaluate_coda(trainer.export_model, val_lat.images, val.images, cfg.eval_decode)
                       if cfg.eval_images else None, base_psnr)


def describe(c: Any) -> str:
    """One line on a CODA config: VAE, codebook, codes per image, LoRA."""
    lora = f"LoRA r{c.lora_rank} on {'/'.join(c.lora_targets)}" if c.lora_rank else "no LoRA"
    return (f"CODA on the frozen {c.vae.upper()}: {c.codebook_size} codes, {c.num_tokens} per image over scales "
            f"{','.join(map(str, c.scales))}, {lora}")


def export_coda(trainer: Trainer, cfg: CODATrainConfig, n_images: int, n_classes: int,
                final: dict[str, Any] | None, base_psnr: float | None) -> Path:
    model = trainer.export_model
    c = model.config
    d = cfg.data
    history = c.notes.split(" | ")[1:] if cfg.init_from else []  # the earlier phases' lines
    note = (f"trained by tokserve `python -m training coda` ({cfg.space} space, "
            f"{trainer.step} steps, {trainer.elapsed_now / 60:.1f} min {cfg.run.budget_clock}, "
            f"{trainer.cpu_now / 60:.1f} CPU min); quantizer input = (TAEF2 latent - {c.latent_shift:.4f}) * "
            f"{c.latent_scale:.4f}")
    if final:
        note += (f"; on {final['n']} {d.val} images: {final['codes_used']}/{c.codebook_size} codes used, "
                 f"latent rel. MSE {final['latent_rel_mse']}")
        if "psnr" in final:
            note += f", PSNR {final['psnr']} dB on {cfg.eval_decode} (VAE alone {base_psnr} dB)"
    note = " | ".join([describe(c), *history, note])
    trained_on = (f"{d.train}: {n_images} images of {n_classes} classes at {d.image_size}px (frozen "
                  f"{c.vae} latents)")
    if cfg.init_from:
        trained_on = f"{c.trained_on}; then {trained_on} ({cfg.space} space)" if c.trained_on else trained_on
    model.config = dataclasses.replace(c, trained_on=trained_on, notes=note)
    out = models.save_pretrained(model, trainer.out / "export", dtype=getattr(torch, cfg.run.export_dtype))
    trainer.log({"event": "export", "path": str(out), "step": trainer.step, "images": trainer.images_seen,
                 "elapsed_s": round(trainer.elapsed_now, 1), "cpu_s": round(trainer.cpu_now, 1), "final": final})
    return out



__all__ = ["DEFAULT_LATENT_CACHE", "CODATrainConfig", "build_coda", "cached_vae_latents", "codes_of", "data_key",
           "encoder_fingerprint", "evaluate_coda", "export_coda", "to_quantizer_input", "train_coda", "usage_stats",
           "vae_psnr"]
