"""MaskGIT training on the codes of a CODA tokenizer (issue #7):
``python -m training maskgit --config maskgit-taef2 --tokenizer runs/coda-taef2/export`` (:func:`train_maskgit`)
pre-encodes the training images into codes once (``<out_dir>/codes.pt``, through the raw-latent cache), then
trains MaskGIT with the cosine mask schedule, label-smoothed cross-entropy on the masked positions, class
dropout (null class) and EMA; sample grids decode MaskGITSampler outputs with the tokenizer; the export's
config carries ``tokenizer`` (``tokenizer_ref``: the served name) and ``trained_classes``.

The codes come through CODA's raw-latent cache (:func:`training.coda.cached_vae_latents`); the loop, held-out
evaluation, sample grids and export are the code generators' shared ones (:mod:`training.code_generator`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models.coda import CODA
from models.hub import weights_sha256
from models.maskgit import cosine_mask
from training.coda import DEFAULT_LATENT_CACHE, cached_vae_latents, codes_of, data_key
from training.code_generator import fit_and_export, held_out_loss, training_codes
from training.config import MaskGITTrainConfig, model_field_overrides, served_tokenizer_name
from training.data import EpochSampler, ImageSet, to_uint8
from training.latents import encode_cached, weights_fingerprint
from training.trainer import Trainer, setup_run


def build_maskgit(cfg: MaskGITTrainConfig, tokenizer: CODA, trained_classes: list[int], ref: str) -> nn.Module:
    overrides = {"trained_classes": tuple(trained_classes), "tokenizer": ref,
                 "tokenizer_sha256": weights_sha256(cfg.tokenizer),
                 "num_tokens": tokenizer.config.num_tokens, "codebook_size": tokenizer.config.codebook_size,
                 **model_field_overrides(cfg.model_overrides)}
    if cfg.init_from:
        model = models.load_pretrained(cfg.init_from).float()
        model.config = dataclasses.replace(model.config, **overrides)
        return model
    return models.create_model(cfg.model, **overrides)


def prepare_codes(cfg: MaskGITTrainConfig, tokenizer: CODA, images: ImageSet, source: str, path: Path,
                  device: torch.device, flip: bool = False) -> ImageSet:
    """Codes (N, L) int64 and labels of ``images``, cached at ``path`` (keyed by the tokenizer's weight files
    and the data selection), through the raw-latent cache shared with ``coda``."""
    d = cfg.data
    key = data_key(d, source, len(images), flip)
    full_key = json.dumps([weights_fingerprint(cfg.tokenizer), key])

    def encode() -> ImageSet:
        lat = cached_vae_latents(tokenizer, images, cfg.latent_cache or DEFAULT_LATENT_CACHE, key,
                                 batch_size=cfg.encode_batch_size, flip=flip, device=device)
        return ImageSet(codes_of(tokenizer, lat.images.to(device)).cpu(), lat.labels)

    return encode_cached(path, key=full_key, encode=encode, field="codes", dtype=None, what="code")


def masked_loss(model: nn.Module, codes: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                drop: torch.Tensor, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-smoothed cross-entropy over the masked positions and the argmax accuracy there; ``drop`` (B,)
    bool replaces labels by the null class (explicit, so a step is a function of the step's generator)."""
    inputs = torch.where(mask, model.config.mask_token_id, codes)
    logits = model(inputs, labels, force_drop=drop)
    picked, target = logits[mask].float(), codes[mask]
    loss = F.cross_entropy(picked, target, label_smoothing=label_smoothing)
    return loss, (picked.argmax(-1) == target).float().mean()


def validation_loss(model: nn.Module, codes: torch.Tensor, labels: torch.Tensor, label_smoothing: float,
                    batch_size: int = 100, seed: int = 0) -> dict[str, float]:
    """Masked-token loss / accuracy on held-out codes with a fixed (seeded) cosine mask, labels kept."""
    model.eval()
    g = torch.Generator().manual_seed(seed)

    def loss_fn(c: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = cosine_mask(len(c), c.shape[1], g, c.device)
        return masked_loss(model, c, y, mask, torch.zeros(len(c), dtype=torch.bool, device=c.device),
                           label_smoothing)

    return held_out_loss(loss_fn, codes, labels, batch_size)


@torch.no_grad()
def maskgit_samples(model: nn.Module, tokenizer: CODA, classes: list[int], per_class: int, *, steps: int,
                    cfg_scale: float, seed: int = 0) -> torch.Tensor:
    """uint8 images (len(classes) * per_class, 3, H, W) sampled with MaskGITSampler, decoded by the tokenizer."""
    from models.sampling import SampleRequest, get_sampler, run_to_completion

    model.eval()
    sampler = get_sampler("maskgit", model)
    reqs = [SampleRequest(class_id=c, seed=seed + i, steps=steps, cfg_scale=cfg_scale, sampler="maskgit")
            for c in classes for i in range(per_class)]
    codes = run_to_completion(sampler, model, reqs, (model.config.num_tokens,)).long()
    return to_uint8(tokenizer.decode(codes))


def train_maskgit(cfg: MaskGITTrainConfig) -> Path:
    run = cfg.run
    device = setup_run(run)
    tokenizer = models.load_pretrained(cfg.tokenizer).float().to(device)
    if not isinstance(tokenizer, CODA):
        raise ValueError(f"{cfg.tokenizer} holds a {type(tokenizer).__name__}; MaskGIT training needs a CODA folder")
    data, val, trained = training_codes(cfg, lambda images, source, path, flip: prepare_codes(
        cfg, tokenizer, images, source, path, device, flip=flip))
    model = build_maskgit(cfg, tokenizer, trained, cfg.tokenizer_ref or served_tokenizer_name(cfg.tokenizer)).to(device)
    gcfg = model.config
    p_drop = gcfg.class_dropout_prob if cfg.class_dropout is None else cfg.class_dropout
    smoothing = gcfg.label_smoothing if cfg.label_smoothing is None else cfg.label_smoothing
    codes_all, labels = data.images, data.labels
    L = codes_all.shape[1]

    trainer = Trainer(cfg, model, run)
    trainer.add_optimizer("model", model.parameters(), cfg.optim)
    trainer.maybe_resume()
    sampler = EpochSampler(len(codes_all), run.batch_size, run.seed)
    gen = torch.Generator()
    used = int(torch.unique(codes_all).numel())
    print(f"maskgit {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{len(codes_all)} code rows of {L} ({used}/{gcfg.codebook_size} codes occur) of {len(trained)} classes, "
          f"class dropout {p_drop}, label smoothing {smoothing}, from step {trainer.step}", flush=True)

    def step_fn(step: int) -> dict[str, float]:
        gen.manual_seed(run.seed * 1_000_003 + step)
        idx = sampler.indices(step)
        codes, y = codes_all[idx].to(device), labels[idx].to(device)
        b = codes.shape[0]
        mask = cosine_mask(b, L, gen, device)
        drop = (torch.rand(b, generator=gen) < p_drop).to(device)
        with trainer.autocast():
            loss, acc = masked_loss(model, codes, y, mask, drop, smoothing)
        return {"loss": float(loss.detach()), "accuracy": float(acc), "mask_ratio": float(mask.float().mean()),
                "grad_norm": trainer.backward_step("model", loss)}

    held_out = None if val is None else (
        lambda m: validation_loss(m, val.images.to(device), val.labels.to(device), smoothing))
    return fit_and_export(trainer, cfg, step_fn, trained, held_out, lambda m, classes: maskgit_samples(
        m, tokenizer, classes, cfg.sample_per_class, steps=cfg.sample_steps or gcfg.num_iter, cfg_scale=cfg.sample_cfg))



__all__ = ["MaskGITTrainConfig", "build_maskgit", "masked_loss", "maskgit_samples", "prepare_codes", "train_maskgit",
           "validation_loss"]
