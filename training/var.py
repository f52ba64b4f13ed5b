"""VAR (next-scale prediction) on the codes of a multi-scale ImageFolder tokenizer (issue #7).

``python -m training var --config var-imagefolder --tokenizer runs/imagefolder-s-64/export``
(:func:`train_var`):

1. encodes the training images once with the frozen tokenizer (eval mode: no quantizer dropout) into codes
   (N, G, L) int64, cached in ``<out_dir>/codes.pt`` and keyed by the tokenizer's weight files and the data
   selection;
2. builds the VAR with the tokenizer's scales, branches, codebook size and code width (``G * C``), and the
   classes it sees (``trained_classes``, ImageNet-1k ids; the last class row is the null class);
3. trains teacher-forced: the input of scales 1..S-1 is the tokenizer's ``teacher_forcing_input`` (the
   area-downsampled running f_hat, as the published ``idxBl_to_var_input``), the target every position's code
   in each branch, cross-entropy with a separate softmax per branch (logits (B, L, G*V) viewed as
   (B, L, G, V)), label smoothing optional, class dropout (``cond_drop``) inside the model, EMA weights;
4. logs, at each sample step, the loss / accuracy on held-out validation codes, and saves a sample grid
   decoded by the tokenizer (:class:`models.sampling.var.VARSampler`, guidance ramped over scales);
5. exports ``<out_dir>/export`` with ``tokenizer`` (``tokenizer_ref``: the served name) and
   ``trained_classes``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models.hub import weights_sha256
from models.var import VAR, tokenizer_matches
from training.code_generator import fit_and_export, held_out_loss, training_codes
from training.config import VARTrainConfig, model_field_overrides, served_tokenizer_name
from training.data import EpochSampler, ImageSet, to_float, to_uint8
from training.latents import encode_cached, weights_fingerprint
from training.progress import progress
from training.trainer import Trainer, setup_run


def load_tokenizer(path: str, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen multi-scale tokenizer a VAR models (it needs ``teacher_forcing_input``)."""
    tok = models.load_pretrained(path).float().to(device).eval()
    if not hasattr(tok, "teacher_forcing_input") or len(getattr(tok.config, "scales", ())) < 2:
        raise ValueError(f"{path} holds a {type(tok).__name__} without multi-scale residual codes; VAR training "
                         f"needs an ImageFolder tokenizer with more than one scale")
    tok.requires_grad_(False)
    return tok


@torch.no_grad()
def encode_codes(tokenizer: nn.Module, images: ImageSet, *, batch_size: int, device: torch.device | str,
                 flip: bool = False) -> ImageSet:
    """Codes (N, G, L) int64 of uint8 ``images`` (mirrored copies appended when ``flip``) and their labels."""
    src = torch.cat([images.images, images.images.flip(-1)]) if flip else images.images
    labels = torch.cat([images.labels, images.labels]) if flip else images.labels
    codes = []
    with progress(total=len(src), desc="encoding codes") as bar:
        for i in range(0, len(src), batch_size):
            codes.append(tokenizer.encode(to_float(src[i : i + batch_size]).to(device)).cpu())
            bar.update(len(codes[-1]))
    return ImageSet(torch.cat(codes), labels)


def cached_codes(cfg: VARTrainConfig, tokenizer: nn.Module, images: ImageSet, source: str, path: Path,
                 device: torch.device | str, flip: bool = False) -> ImageSet:
    """:func:`encode_codes`, read from / written to ``path`` (keyed by the tokenizer's weight files and the
    data selection)."""
    d = cfg.data
    key = json.dumps([weights_fingerprint(cfg.tokenizer), source, d.num_classes, d.classes, len(images),
                      d.image_size, flip])
    return encode_cached(path, key=key, field="codes", dtype=None, what="code", encode=lambda: encode_codes(
        tokenizer, images, batch_size=cfg.encode_batch_size, device=device, flip=flip))


def build_var(cfg: VARTrainConfig, tokenizer: nn.Module, trained_classes: list[int], ref: str) -> VAR:
    """The VAR to train: its shape fields follow the tokenizer; ``init_from`` continues a serving folder."""
    t = tokenizer.config
    overrides = {"trained_classes": tuple(trained_classes), "tokenizer": ref,
                 "tokenizer_sha256": weights_sha256(cfg.tokenizer), "scales": tuple(t.scales),
                 "num_branches": t.num_branches, "codebook_size": t.codebook_size,
                 "code_dim": t.num_branches * t.code_dim, **model_field_overrides(cfg.model_overrides)}
    if cfg.init_from:
        model = models.load_pretrained(cfg.init_from).float()
        model.config = dataclasses.replace(model.config, **overrides)
    else:
        model = models.create_model(cfg.model, **overrides)
    if not isinstance(model, VAR) or not tokenizer_matches(model.config, t):
        raise ValueError(f"{cfg.model} does not model the codes of {cfg.tokenizer}")
    return model


def var_loss(model: VAR, tokenizer: nn.Module, codes: torch.Tensor, labels: torch.Tensor,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced cross-entropy over every position of every branch (separate softmax per branch) and
    the argmax accuracy; codes (B, G, L) int64, labels (B,) (the model applies its class dropout in
    training mode)."""
    cfg = model.config
    with torch.no_grad():
        x_tf = tokenizer.teacher_forcing_input(codes)
    logits = model(labels, x_tf)  # (B, L, G*V)
    B, L, _ = logits.shape
    logits = logits.view(B, L, cfg.num_branches, cfg.codebook_size)
    target = codes.transpose(1, 2)  # (B, L, G)
    loss = F.cross_entropy(logits.reshape(-1, cfg.codebook_size), target.reshape(-1), label_smoothing=label_smoothing)
    acc = (logits.argmax(-1) == target).float().mean()
    return loss, acc


@torch.no_grad()
def validation_loss(model: VAR, tokenizer: nn.Module, codes: torch.Tensor, labels: torch.Tensor,
                    label_smoothing: float = 0.0, batch_size: int = 100) -> dict[str, float]:
    """Teacher-forced loss / accuracy on held-out codes (eval mode: labels kept)."""
    model.eval()
    return held_out_loss(lambda c, y: var_loss(model, tokenizer, c, y, label_smoothing), codes, labels, batch_size)


@torch.no_grad()
def var_samples(model: VAR, tokenizer: nn.Module, classes: list[int], per_class: int, *, cfg_scale: float,
                seed: int = 0) -> torch.Tensor:
    """uint8 images (len(classes) * per_class, 3, H, W) sampled with VARSampler, decoded by the tokenizer."""
    from models.sampling import SampleRequest, get_sampler, run_to_completion

    model.eval()
    g = model.config
    sampler = get_sampler("var", model, tokenizer=tokenizer, device=next(model.parameters()).device)
    reqs = [SampleRequest(class_id=c, seed=seed + i, steps=g.num_scales, cfg_scale=cfg_scale, sampler="var")
            for c in classes for i in range(per_class)]
    codes = run_to_completion(sampler, model, reqs, (g.num_branches, g.num_tokens)).long()
    return to_uint8(tokenizer.decode(codes))


def train_var(cfg: VARTrainConfig) -> Path:
    run = cfg.run
    device = setup_run(run)
    tokenizer = load_tokenizer(cfg.tokenizer, device)
    data, val, trained = training_codes(cfg, lambda images, source, path, flip: cached_codes(
        cfg, tokenizer, images, source, path, device, flip=flip))
    model = build_var(cfg, tokenizer, trained, cfg.tokenizer_ref or served_tokenizer_name(cfg.tokenizer)).to(device)
    g = model.config
    codes_all, labels = data.images, data.labels

    trainer = Trainer(cfg, model, run)
    trainer.add_optimizer("model", model.parameters(), cfg.optim)
    trainer.maybe_resume()
    sampler = EpochSampler(len(codes_all), run.batch_size, run.seed)
    used = [int(torch.unique(codes_all[:, b]).numel()) for b in range(g.num_branches)]
    print(f"var {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{len(codes_all)} code pyramids of {g.num_branches} x {g.num_tokens} (scales "
          f"{','.join(map(str, g.scales))}; codes occurring per branch {used} of {g.codebook_size}) of "
          f"{len(trained)} classes, class dropout {g.cond_drop}, from step {trainer.step}", flush=True)

    def step_fn(step: int) -> dict[str, float]:
        torch.manual_seed(run.seed * 1_000_003 + step)  # the model's class dropout draws from the global RNG
        idx = sampler.indices(step)
        codes, y = codes_all[idx].to(device), labels[idx].to(device)
        model.train()
        with trainer.autocast():
            loss, acc = var_loss(model, tokenizer, codes, y, cfg.label_smoothing)
        return {"loss": float(loss.detach()), "accuracy": float(acc), "grad_norm": trainer.backward_step("model", loss)}

    held_out = None if val is None else (
        lambda m: validation_loss(m, tokenizer, val.images.to(device), val.labels.to(device), cfg.label_smoothing))
    return fit_and_export(trainer, cfg, step_fn, trained, held_out, lambda m, classes: var_samples(
        m, tokenizer, classes, cfg.sample_per_class, cfg_scale=cfg.sample_cfg))


__all__ = ["VARTrainConfig", "build_var", "cached_codes", "encode_codes", "train_var", "var_loss", "var_samples",
           "validation_loss"]
