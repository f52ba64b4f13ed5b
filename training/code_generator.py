"""What the trainers of generators over a discrete tokenizer's codes share (MaskGIT in :mod:`training.maskgit`,
VAR in :mod:`training.var`): the training and held-out codes (:func:`training_codes`), the held-out loss over
batches of codes, and the loop with its evaluation, sample grids and export (:func:`fit_and_export`). Their
common config is :class:`training.config.CodeGeneratorTrainConfig`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

import models
from training.config import CodeGeneratorTrainConfig
from training.data import ImageSet, load_images
from training.plots import plot_losses, save_grid
from training.tokenizer import load_training_images
from training.trainer import Trainer

# (images, data source, cache path, flip) -> codes and labels, cached at the path (each family's encoder)
EncodeCodes = Callable[[ImageSet, str, Path, bool], ImageSet]


def training_codes(cfg: CodeGeneratorTrainConfig, encode: EncodeCodes) -> tuple[ImageSet, ImageSet | None, list[int]]:
    """The codes of the training images (cached at ``code_cache``, default ``<out_dir>/codes.pt``; mirrored
    copies too with ``encode_flip``), those of the first ``val_images`` held-out images
    (``<out_dir>/val_codes.pt``; None when 0) and the sorted classes the training codes hold."""
    out_dir = Path(cfg.run.out_dir)
    data = encode(load_training_images(cfg), cfg.data.train, Path(cfg.code_cache or out_dir / "codes.pt"),
                  cfg.encode_flip)
    val = None
    if cfg.val_images:
        images = load_images(cfg.data.val, cfg.data.image_size, max_images=cfg.val_images)
        val = encode(images, cfg.data.val, out_dir / "val_codes.pt", False)
    return data, val, sorted(set(int(c) for c in data.labels.tolist()))


@torch.no_grad()
def held_out_loss(loss_fn, codes: torch.Tensor, labels: torch.Tensor, batch_size: int = 100) -> dict[str, float]:
    """Mean of ``loss_fn(codes, labels) -> (loss, accuracy)`` over batches of held-out codes, weighted by batch
    size: ``{"val_loss", "val_accuracy"}``."""
    tot_l, tot_a, n = 0.0, 0.0, 0
    for i in range(0, len(codes), batch_size):
        c, y = codes[i : i + batch_size], labels[i : i + batch_size]
        loss, acc = loss_fn(c, y)
        tot_l, tot_a, n = tot_l + float(loss) * len(c), tot_a + float(acc) * len(c), n + len(c)
    return {"val_loss": round(tot_l / n, 4), "val_accuracy": round(tot_a / n, 4)}



def fit_and_export(trainer: Trainer, cfg: CodeGeneratorTrainConfig, step_fn, trained: list[int],
                   held_out: Callable[[nn.Module], dict[str, float]] | None,
                   samples: Callable[[nn.Module, list[int]], torch.Tensor]) -> Path:
    """The loop and export shared by the code-generator trainers: ``trainer.fit(step_fn)``, and at each sample
    step (once; ``fit`` also calls it after the last step) an ``eval`` record from ``held_out(ema_model)``, a
    grid of ``samples(ema_model, classes)`` (``sample_classes`` spread over ``trained``, ``sample_per_class``
    columns) and the loss plot; then ``<out>/export`` and an ``export`` record."""
    run = cfg.run
    k = cfg.sample_classes
    grid_classes = trained[:: max(1, len(trained) // k)][:k]
    done: set[int] = set()

    def on_sample(step: int) -> None:
        if step in done:
            return
        done.add(step)
        m = trainer.export_model
        if held_out is not None:
            res = {"event": "eval", "step": step, **held_out(m)}
            trainer.log(res)
            print("eval " + json.dumps(res), flush=True)
        images = samples(m, grid_classes)
        save_grid(images.cpu(), trainer.out / "samples" / f"samples_{step:06d}.png", nrow=cfg.sample_per_class,
                  scale=2)
        plot_losses(trainer.out / "metrics.jsonl", trainer.out / "loss.png")

    trainer.fit(step_fn, batch_size=run.batch_size, on_sample=on_sample)
    out = models.save_pretrained(trainer.export_model, trainer.out / "export", dtype=getattr(torch, run.export_dtype))
    trainer.log({"event": "export", "path": str(out), "step": trainer.step, "images": trainer.images_seen,
                 "elapsed_s": round(trainer.elapsed_now, 1), "cpu_s": round(trainer.cpu_now, 1)})
    return out



__all__ = ["CodeGeneratorTrainConfig", "EncodeCodes", "fit_and_export", "held_out_loss", "training_codes"]
