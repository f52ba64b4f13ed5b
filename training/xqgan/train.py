"""Train an XQ-GAN tokenizer from a TOML config: ``python -m training.xqgan configs/xqgan/v-lfq-s.toml``.

``train_xqgan(cfg)`` checks the config against its model (:func:`~training.xqgan.config.check_model`), builds
the tokenizer (by name, or from ``model.init_from`` for fine-tuning), applies the fine-tuning modes, and runs
:class:`~training.xqgan.objective.XQGANObjective` with the shared :class:`training.trainer.Trainer` (EMA,
checkpoints, resume, logs). The export folder ``<out_dir>/export`` is a plain serving folder: LoRA adapters
are merged into the base weights first, so it loads with ``models.load_pretrained`` like any tokenizer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

import models
from training.data import EpochSampler, augment, load_images, select_classes, to_float, to_uint8
from training.plots import save_grid
from training.trainer import Trainer, setup_run
from training.xqgan.config import XQGANTrainConfig, check_model, model_class_and_config, to_dict
from training.xqgan.finetune import apply_finetune, describe, merge_for_serving, trainable_parameters
from training.xqgan.objective import XQGANObjective


def build_model(cfg: XQGANTrainConfig) -> nn.Module:
    """The tokenizer to train: ``init_from``'s weights, or the named configuration with random weights."""
    if cfg.model.init_from:
        return models.load_pretrained(cfg.model.init_from).float().train()
    cls, mcfg = model_class_and_config(cfg)
    return cls(mcfg)


def export_model(model: nn.Module, folder: Path, dtype: torch.dtype, note: str) -> Path:
    """A merged copy of ``model`` saved as a serving folder."""
    m = copy.deepcopy(model).cpu()
    merge_for_serving(m)
    fields = {f.name for f in dataclasses.fields(m.config)}
    if "notes" in fields:
        m.config = dataclasses.replace(m.config, notes=note)
    return models.save_pretrained(m, folder, dtype=dtype)


def train_xqgan(cfg: XQGANTrainConfig) -> Path:
    """Run the whole thing; returns the export folder."""
    check_model(cfg)
    run = cfg.run
    device = setup_run(run)
    d = cfg.data
    classes = select_classes(
        d.train, num_classes=d.num_classes, classes=d.classes, label_column=d.label_column
    )
    data = load_images(
        d.train,
        d.image_size,
        classes=classes,
        max_images=d.max_images,
        image_column=d.image_column,
        label_column=d.label_column,
    )
    val = load_images(d.val, d.image_size, max_images=8, desc=None)
    model = build_model(cfg)
    report = apply_finetune(model, cfg.finetune)
    model = model.to(device)
    objective = XQGANObjective(cfg, model).to(device)
    extra = {"objective": objective}
    trainer = Trainer(cfg, model, run, extra=extra)
    trainer.add_optimizer("model", trainable_parameters(model) + objective.model_parameters(), cfg.optim)
    if objective.disc is not None:
        trainer.add_optimizer(
            "disc",
            objective.disc_parameters(),
            cfg.optim.model_copy(update={"lr": cfg.discriminator.lr, "betas": (0.5, 0.9), "weight_decay": 0.0}),
        )
    trainer.maybe_resume()
    sampler = EpochSampler(len(data), run.batch_size, run.seed)
    gen = torch.Generator()
    print(
        f"xqgan {cfg.model.backbone} {cfg.model.name or cfg.model.init_from}: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters "
        f"({report.trainable / 1e6:.2f} M trainable; {describe(cfg.finetune)}), {len(data)} images, "
        f"device {device}, from step {trainer.step}",
        flush=True,
    )

    def step_fn(step: int) -> dict[str, float]:
        gen.manual_seed(run.seed * 1_000_003 + step)
        x = augment(
            data.images[sampler.indices(step)], d.image_size, gen, crop_scale=d.crop_scale, flip=d.flip
        ).to(device)
        objective.train()
        with trainer.autocast():
            loss, x_hat, out = objective.generator_loss(model, x, step, gen)
        out["grad_norm"] = trainer.backward_step("model", loss)
        if objective.gan_active(step):
            with trainer.autocast():
                dl, dout = objective.discriminator_loss(x, x_hat, step, gen)
            trainer.backward_step("disc", dl)
            out.update(dout)
        return out

    def on_sample(step: int) -> None:
        m = trainer.export_model.eval()
        with torch.no_grad():
            rec = to_uint8(m.decode(m.encode(to_float(val.images.to(device)))))
        save_grid(
            torch.cat([val.images, rec.cpu()]),
            trainer.out / "samples" / f"recon_{step:06d}.png",
            nrow=val.images.shape[0],
            scale=2,
        )

    trainer.fit(step_fn, batch_size=run.batch_size, on_sample=on_sample)
    (trainer.out / "xqgan.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    note = (
        f"XQ-GAN {cfg.model.backbone} pipeline trained by `python -m training.xqgan` "
        f"for {trainer.step} steps "
        f"({trainer.images_seen} images; {describe(cfg.finetune)})"
    )
    out = export_model(trainer.export_model, trainer.out / "export", getattr(torch, run.export_dtype), note)
    trainer.log({"event": "export", "path": str(out), "step": trainer.step})
    return out


__all__ = ["build_model", "export_model", "train_xqgan"]
