"""Tokenizer training (SoftVQ family): reconstruction + LPIPS + SoftVQ KL + alignment + optional PatchGAN.

``train_tokenizer(cfg)`` runs the whole thing and returns the exported serving folder
(``<out_dir>/export``: ``config.json`` + fp16 ``model.safetensors``). Per step, on a batch x (B, 3, H, W):

    enc = model.encode_full(x); x_hat = model.decode(enc.tokens)
    loss = w_rec * rec(x, x_hat) + w_lpips * LPIPS(x, x_hat) + w_kl * [H(q) - H(E_x q)]
         + w_align * (1 - cos(MLP(tokens), frozen EfficientNet-Lite0 features of x))
         + [after disc_start] w_disc * lambda_adaptive * hinge_g(D(x_hat))
    then, after disc_start, one discriminator step on hinge_d(D(x), D(x_hat.detach())).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

import models
from training.config import TokenizerTrainConfig
from training.data import EpochSampler, ImageSet, augment, load_images, select_classes, to_float, to_uint8
from training.losses import (
    PatchDiscriminator,
    TokenAligner,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    kl_from_losses,
    reconstruction_loss,
)
from training.perceptual import LPIPS, EfficientNetLite0
from training.plots import plot_losses, save_grid
from training.trainer import Trainer, finished_export, setup_run


def _f(t: torch.Tensor) -> float:
    return float(t.detach())


def last_decoder_weight(model: nn.Module) -> torch.Tensor:
    """The weight of the decoder's last layer (for the adaptive GAN weight): the model's ``last_layer``
    attribute when it has one, else the last >= 2-d parameter whose name starts with ``decoder``."""
    last = getattr(model, "last_layer", None)
    if isinstance(last, torch.Tensor):
        return last
    cands = [p for n, p in model.named_parameters() if n.startswith("decoder") and p.dim() >= 2]
    if not cands:
        raise ValueError(f"{type(model).__name__}: no decoder weight found for the adaptive GAN weight")
    return cands[-1]


def build_tokenizer(cfg: TokenizerTrainConfig) -> nn.Module:
    if cfg.init_from:
        model = models.load_pretrained(cfg.init_from)
        if cfg.model_overrides:
            model.config = dataclasses.replace(model.config, **cfg.model_overrides)
        return model.float()
    return models.create_model(cfg.model, **cfg.model_overrides)


def load_training_images(cfg) -> ImageSet:
    d = cfg.data
    classes = select_classes(d.train, num_classes=d.num_classes, classes=d.classes, label_column=d.label_column)
    return load_images(d.train, d.image_size, classes=classes, max_images=d.max_images,
                       image_column=d.image_column, label_column=d.label_column)


@torch.no_grad()
def reconstruction_grid(model: nn.Module, images: torch.Tensor, path: Path) -> Path:
    """Originals (top row) above reconstructions (bottom row); images uint8 (B, 3, H, W)."""
    model.eval()
    rec = to_uint8(model.decode(model.encode(to_float(images))))
    return save_grid(torch.cat([images, rec]), path, nrow=images.shape[0], scale=2)


def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    run, lc = cfg.run, cfg.loss
    done = finished_export(run)
    if done is not None:  # before loading (up to 100k) images
        print(f"{run.out_dir}: this run already finished (step {done[1]} of {run.steps}); its export is {done[0]}. "
              "Nothing to do (more run.steps, or another run.out_dir, trains on).", flush=True)
        return done[0]
    device = setup_run(run)
    data = load_training_images(cfg)
    val = load_images(cfg.data.val, cfg.data.image_size, max_images=8, desc=None)
    model = build_tokenizer(cfg)
    if cfg.init == "patch-routing" and not cfg.init_from:
        from training.init import patch_routing_init

        patch_routing_init(model, to_float(data.images[: cfg.init_images]), seed=run.seed)
    model = model.to(device)
    token_dim = model.config.token_dim

    lpips = LPIPS().to(device) if lc.lpips_weight > 0 else None
    encoder = EfficientNetLite0(resolution=lc.align_resolution).to(device) if lc.align_weight > 0 else None
    extra: dict[str, nn.Module] = {}
    if encoder is not None:
        extra["aligner"] = TokenAligner(token_dim, 1280, lc.align_hidden).to(device)
    if lc.disc_weight > 0:
        extra["disc"] = PatchDiscriminator(lc.disc_ndf, lc.disc_layers).to(device)

    trainer = Trainer(cfg, model, run, extra=extra)
    params = list(model.parameters()) + (list(extra["aligner"].parameters()) if "aligner" in extra else [])
    trainer.add_optimizer("model", params, cfg.optim)
    if "disc" in extra:
        trainer.add_optimizer("disc", extra["disc"].parameters(),
                              cfg.optim.model_copy(update={"lr": lc.disc_lr, "betas": (0.5, 0.9), "weight_decay": 0.0}))
    trainer.maybe_resume()
    last_layer = last_decoder_weight(model)
    sampler = EpochSampler(len(data), run.batch_size, run.seed)
    gen = torch.Generator()
    print(f"tokenizer {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{len(data)} training images, device {device}, from step {trainer.step}", flush=True)

    def step_fn(step: int) -> dict[str, float]:
        gen.manual_seed(run.seed * 1_000_003 + step)  # augmentation is a function of the step: exact resume
        x = augment(data.images[sampler.indices(step)], cfg.data.image_size, gen, crop_scale=cfg.data.crop_scale,
                    flip=cfg.data.flip).to(device)
        gan_on = "disc" in extra and step >= lc.disc_start
        out: dict[str, float] = {}
        with trainer.autocast():
            enc = model.encode_full(x)
            x_hat = model.decode(enc.tokens)
            rec = reconstruction_loss(x, x_hat.float(), lc.recon)
            nll = lc.recon_weight * rec
            out["rec"] = _f(rec)
            if lpips is not None:
                n = lc.lpips_max_images or x.shape[0]
                p = lpips(x[:n], x_hat[:n].float()).mean()
                nll = nll + lc.lpips_weight * p
                out["lpips"] = _f(p)
            loss = nll
            kl = kl_from_losses(enc.quantizer.losses) if lc.kl_weight > 0 else None
            if kl is not None:
                loss = loss + lc.kl_weight * kl
                out["kl"] = _f(kl)
            if encoder is not None:
                with torch.no_grad():
                    feats = encoder.features(x)
                a = extra["aligner"](enc.tokens.float(), feats.float())
                loss = loss + lc.align_weight * a
                out["align"] = _f(a)
            if gan_on:
                g = hinge_g_loss(extra["disc"](x_hat))
                w = adaptive_weight(nll, g, last_layer) if lc.disc_adaptive else torch.tensor(1.0)
                loss = loss + lc.disc_weight * w * g
                out["g_loss"], out["adaptive_w"] = _f(g), _f(w)
        out["grad_norm"] = trainer.backward_step("model", loss)
        out["loss"] = _f(loss)
        if gan_on:
            with trainer.autocast():
                d = hinge_d_loss(extra["disc"](x), extra["disc"](x_hat.detach()))
            trainer.backward_step("disc", d)
            out["d_loss"] = _f(d)
        return out

    def on_sample(step: int) -> None:
        reconstruction_grid(trainer.export_model, val.images, trainer.out / "samples" / f"recon_{step:06d}.png")
        plot_losses(trainer.out / "metrics.jsonl", trainer.out / "loss.png")

    trainer.fit(step_fn, batch_size=run.batch_size, on_sample=on_sample)
    return export_tokenizer(trainer, cfg)


def export_tokenizer(trainer: Trainer, cfg: TokenizerTrainConfig) -> Path:
    model = trainer.export_model
    note = (f"trained by tokserve `python -m training tokenizer` for {trainer.step} steps "
            f"({trainer.images_seen} images, {trainer.elapsed_now / 60:.1f} min {cfg.run.budget_clock}, "
            f"{trainer.cpu_now / 60:.1f} CPU min)")
    fields = {f.name for f in dataclasses.fields(model.config)}
    updates = {}
    if "trained_on" in fields:
        updates["trained_on"] = f"{cfg.data.train} ({cfg.data.image_size}px)"
    if "notes" in fields:
        updates["notes"] = note
    model.config = dataclasses.replace(model.config, **updates)
    dtype = getattr(torch, cfg.run.export_dtype)
    out = models.save_pretrained(model, trainer.out / "export", dtype=dtype)
    trainer.log({"event": "export", "path": str(out), "step": trainer.step, "images": trainer.images_seen,
                 "elapsed_s": round(trainer.elapsed_now, 1), "cpu_s": round(trainer.cpu_now, 1)})
    return out


__all__ = ["build_tokenizer", "last_decoder_weight", "reconstruction_grid", "train_tokenizer"]
