"""Generator training (SiT flow matching, DiT diffusion or MAR) on a tokenizer's normalised latents.

``train_generator(cfg)``:
1. encodes the training images once into a cache (``<out_dir>/latents.pt`` unless ``latent_cache`` is set),
   keyed by the tokenizer weights and the data selection;
2. when the tokenizer config still has the identity ``vq_mean`` / ``vq_std``, measures them on (up to
   ``stats_images`` of) those latents and writes them into the tokenizer's ``config.json``;
3. trains the generator on ``(z - vq_mean) / vq_std`` with class dropout (labels replaced by the null class
   ``num_classes`` with probability ``class_dropout``), EMA, the shared schedule, checkpoints and grids; the
   objective follows the generator family (``config.family``): ``sit`` flow matching, ``dit`` eps MSE (+ VLB),
   ``mar`` :func:`models.sampling.mar.mar_loss` (random mask ratio, per-token diffusion head);
4. exports ``<out_dir>/export`` (fp16) with ``trained_classes`` = the labels seen and ``tokenizer`` set.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import models
from models.hub import weights_sha256
from models.sampling.diffusion import create_diffusion
from models.sampling.mar import mar_loss
from training.config import GeneratorTrainConfig, served_tokenizer_name
from training.data import EpochSampler, ImageSet
from training.feature_cache import open_feature_cache
from training.latents import (
    LatentStats,
    encode_cached,
    encode_image_set,
    has_latent_stats,
    weights_fingerprint,
    write_latent_stats,
)
from training.losses import TokenAligner
from training.objectives import diffusion_loss, flow_matching_loss, sample_time
from training.plots import plot_losses, save_grid
from training.progress import progress
from training.tokenizer import load_training_images
from training.trainer import Trainer, setup_run

FAMILIES = ("sit", "dit", "mar")


def family(model: nn.Module) -> str:
    fam = getattr(model.config, "family", "sit")
    if fam not in FAMILIES:
        raise ValueError(f"{type(model).__name__} ({fam!r}) is not a continuous-latent generator: {FAMILIES}")
    return fam


class _LoopClassDrop:
    """What :func:`mar_loss` calls, with the label dropout decided by the training loop (its own generator,
    ``class_dropout``) through ``force_drop``, as for SiT / DiT, instead of the module's train-mode coin flips."""

    def __init__(self, model: nn.Module, drop: torch.Tensor) -> None:
        self.model, self.drop = model, drop

    @property
    def config(self):
        return self.model.config

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, mask, labels, force_drop=self.drop)

    def head(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.model.head(x, t, z)


def mar_terms(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, drop: torch.Tensor,
              gen: torch.Generator) -> dict[str, torch.Tensor | float]:
    """MAR's loss on a batch: mask ratio, mask, head steps and noise from ``gen``; labels dropped where ``drop``."""
    res = mar_loss(_LoopClassDrop(model, drop), x0, y, generator=gen)
    return {"loss": res.loss, "mse": res.mse, "vb": res.vb, "mask_ratio": res.mask_ratio}


def build_generator(cfg: GeneratorTrainConfig, trained_classes: list[int], tokenizer_ref: str) -> nn.Module:
    overrides = {"trained_classes": tuple(trained_classes), "tokenizer": tokenizer_ref,
                 "tokenizer_sha256": weights_sha256(cfg.tokenizer), **cfg.model_overrides}
    if cfg.init_from:
        model = models.load_pretrained(cfg.init_from).float()
        model.config = dataclasses.replace(model.config, **overrides)
        return model
    return models.create_model(cfg.model, **overrides)


def _write_stats_once(cfg: GeneratorTrainConfig, tokenizer: nn.Module, tokens: torch.Tensor) -> None:
    """When the tokenizer config still has the identity ``vq_mean`` / ``vq_std``: measure them on (up to
    ``stats_images`` of) ``tokens`` and write them into the tokenizer folder's ``config.json``."""
    if has_latent_stats(tokenizer):
        return
    stats = LatentStats.of(tokens[: cfg.stats_images].float())
    write_latent_stats(cfg.tokenizer, stats)
    tokenizer.config = dataclasses.replace(tokenizer.config, vq_mean=stats.vq_mean, vq_std=stats.vq_std)
    print(f"latent stats written to {cfg.tokenizer}: {stats}", flush=True)


def latent_cache_path(cfg: GeneratorTrainConfig) -> Path:
    return Path(cfg.latent_cache or Path(cfg.run.out_dir) / "latents.pt")


def prepare_latents(cfg: GeneratorTrainConfig, tokenizer: nn.Module, device: torch.device) -> ImageSet:
    """The training images' raw tokens, encoded once into the latent cache (:func:`encode_cached`: a later run
    with the same tokenizer weights and data settings loads them without loading any image), and the latent
    statistics written once (:func:`_write_stats_once`)."""
    d = cfg.data
    key = json.dumps([weights_fingerprint(cfg.tokenizer), d.train, d.num_classes, d.classes, d.max_images,
                      d.image_size, cfg.encode_flip])
    latents = encode_cached(latent_cache_path(cfg), key=key, encode=lambda: encode_image_set(
        tokenizer, load_training_images(cfg), cfg.encode_batch_size, flip=cfg.encode_flip, device=device))
    _write_stats_once(cfg, tokenizer, latents.images)
    return latents


@torch.no_grad()
def prepare_cached_latents(cfg: GeneratorTrainConfig, tokenizer: nn.Module,
                           device: torch.device) -> tuple[ImageSet, torch.Tensor]:
    """Tokens of the feature cache's TAEF2 latents (``tokenizer.tokens_from_latents``; mirrored copies appended
    when ``encode_flip``: the latent grid flipped left-right) and the matching Lite0 features (N, 1280, g, g).
    Tokens are cached in the latent cache by :func:`encode_cached` like :func:`prepare_latents`, and the
    statistics written the same way."""
    if not hasattr(tokenizer, "tokens_from_latents"):
        raise ValueError(f"{cfg.tokenizer}: a feature cache needs TAEF2 or a tokenizer on it (tokens_from_latents)")
    fc = open_feature_cache(cfg.feature_cache)
    n = len(fc) if cfg.data.max_images is None else min(len(fc), cfg.data.max_images)
    feats = torch.from_numpy(np.array(fc.lite[:n]))
    if cfg.encode_flip:
        feats = torch.cat([feats, feats.flip(-1)])

    def encode() -> ImageSet:
        z = torch.from_numpy(np.array(fc.latents[:n]))
        labels = torch.from_numpy(np.array(fc.labels[:n]))
        if cfg.encode_flip:
            z, labels = torch.cat([z, z.flip(-1)]), torch.cat([labels, labels])
        tokenizer.eval()
        out = []
        with progress(total=len(z), desc=f"encoding cached TAEF2 latents ({cfg.feature_cache})") as bar:
            for i in range(0, len(z), 500):
                out.append(tokenizer.tokens_from_latents(z[i : i + 500].float().to(device)).cpu())
                bar.update(len(out[-1]))
        return ImageSet(torch.cat(out), labels)

    key = json.dumps([weights_fingerprint(cfg.tokenizer), str(cfg.feature_cache), n, cfg.encode_flip])
    latents = encode_cached(latent_cache_path(cfg), key=key, encode=encode)
    _write_stats_once(cfg, tokenizer, latents.images)
    return latents, feats


class BlockOutput:
    """Keeps the output of one module of the model (a forward hook), for representation alignment."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: object, output: torch.Tensor) -> None:
        self.value = output


@torch.no_grad()
def sample_grid(generator: nn.Module, tokenizer: nn.Module, classes: list[int], path: Path, *, per_class: int,
                steps: int, cfg_scale: float, sampler_name: str, seed: int = 0) -> Path:
    """One row per class of ``per_class`` samples, decoded by the tokenizer, as PNG (any family's sampler)."""
    from training.evaluate import generate

    generator.eval()
    images, _ = generate(generator, tokenizer, classes, per_class, cfg_scale=cfg_scale, steps=steps,
                         sampler_name=sampler_name, seed=seed)
    return save_grid(images, path, nrow=per_class, scale=2)


def train_generator(cfg: GeneratorTrainConfig) -> Path:
    if cfg.repa_weight > 0 and not cfg.feature_cache:
        raise ValueError("repa_weight > 0 needs feature_cache (the Lite0 features of the training images)")
    run = cfg.run
    device = setup_run(run)
    tokenizer = models.load_pretrained(cfg.tokenizer).float().to(device)
    feats = None
    if cfg.feature_cache:
        latents, feats = prepare_cached_latents(cfg, tokenizer, device)
    else:
        latents = prepare_latents(cfg, tokenizer, device)
    trained = sorted(set(int(c) for c in latents.labels.tolist()))
    model = build_generator(cfg, trained, cfg.tokenizer_ref or served_tokenizer_name(cfg.tokenizer)).to(device)
    gcfg = model.config
    z_all = tokenizer.normalize_latents(latents.images.float())  # (N, L, C) normalised, float32
    labels = latents.labels
    if tuple(z_all.shape[1:]) != (gcfg.num_tokens, gcfg.token_dim):
        raise ValueError(f"tokenizer latents {tuple(z_all.shape[1:])} do not fit generator "
                         f"({gcfg.num_tokens}, {gcfg.token_dim})")
    p_drop = gcfg.class_dropout_prob if cfg.class_dropout is None else cfg.class_dropout
    fam = family(model)
    diff = create_diffusion("", getattr(gcfg, "noise_schedule", "cosine")) if fam == "dit" else None

    aligner, hidden = None, None
    if cfg.repa_weight > 0:
        if fam == "mar" or not 1 <= cfg.repa_depth <= len(model.blocks):
            raise ValueError(f"REPA needs a SiT / DiT and 1 <= repa_depth <= {len(getattr(model, 'blocks', []))}")
        aligner = TokenAligner(gcfg.hidden_size, feats.shape[1], cfg.repa_hidden).to(device)
        hidden = BlockOutput(model.blocks[cfg.repa_depth - 1])
    trainer = Trainer(cfg, model, run, extra={"aligner": aligner} if aligner is not None else None)
    params = list(model.parameters()) + (list(aligner.parameters()) if aligner is not None else [])
    trainer.add_optimizer("model", params, cfg.optim)
    trainer.maybe_resume()
    sampler = EpochSampler(len(z_all), run.batch_size, run.seed)
    gen = torch.Generator()
    print(f"generator {cfg.model} ({fam}): {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{len(z_all)} latents of {len(trained)} classes, vq_mean={tokenizer.config.vq_mean:.5g} "
          f"vq_std={tokenizer.config.vq_std:.5g}, z std after normalising {float(z_all.std()):.3f}, "
          f"from step {trainer.step}", flush=True)

    def step_fn(step: int) -> dict[str, float]:
        gen.manual_seed(run.seed * 1_000_003 + step)
        idx = sampler.indices(step)
        x0, y = z_all[idx].to(device), labels[idx].to(device)
        b = x0.shape[0]
        drop = (torch.rand(b, generator=gen) < p_drop).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        with trainer.autocast():
            if fam == "mar":
                terms = mar_terms(model, x0, y, drop, gen)
            elif fam == "dit":
                k = torch.randint(0, diff.num_steps, (b,), generator=gen).to(device)
                terms = diffusion_loss(model, diff, x0, y, k, noise, gcfg.learn_sigma, cfg.learn_sigma_vlb, drop)
            else:
                t = sample_time(b, cfg.t_sampling, gen, cfg.t_lognormal, device)
                terms = {"loss": flow_matching_loss(model, x0, y, t, noise, drop)}
            if aligner is not None:
                a = aligner(hidden.value.float(), feats[idx].float().to(device))
                terms["flow" if fam == "sit" else "diffusion"] = terms["loss"]
                terms["repa"] = a
                terms["loss"] = terms["loss"] + cfg.repa_weight * a
        out = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()}
        out["grad_norm"] = trainer.backward_step("model", terms["loss"])
        return out

    grid_classes = trained[:: max(1, len(trained) // 8)][:8]

    def on_sample(step: int) -> None:
        sample_grid(trainer.export_model, tokenizer, grid_classes, trainer.out / "samples" / f"samples_{step:06d}.png",
                    per_class=4, steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg,
                    sampler_name=cfg.sample_sampler or gcfg.sampler)
        plot_losses(trainer.out / "metrics.jsonl", trainer.out / "loss.png")
        if cfg.wip_dir:
            trainer.save_wip(cfg.wip_dir)  # resumable in a later session with run.resume_from=<wip_dir>

    trainer.fit(step_fn, batch_size=run.batch_size, on_sample=on_sample)
    out = models.save_pretrained(trainer.export_model, trainer.out / "export", dtype=getattr(torch, run.export_dtype))
    trainer.log({"event": "export", "path": str(out), "step": trainer.step, "images": trainer.images_seen,
                 "elapsed_s": round(trainer.elapsed_now, 1), "cpu_s": round(trainer.cpu_now, 1),
                 "stats": dataclasses.asdict(LatentStats(tokenizer.config.vq_mean, tokenizer.config.vq_std, 0))})
    return out
