"""PNG outputs of a run: loss curves from ``metrics.jsonl`` and image grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> Image.Image:
    """uint8 (B, 3, H, W) -> one PIL image with ``nrow`` images per row and white padding."""
    b, _, h, w = images.shape
    rows = (b + nrow - 1) // nrow
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = arr[i]
    return Image.fromarray(canvas)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int = 1) -> Path:
    """Write :func:`image_grid` as PNG (nearest-neighbour upscaled by ``scale``)."""
    im = image_grid(images, nrow)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def read_metrics(path: str | Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def plot_losses(metrics_path: str | Path, out_path: str | Path, keys: list[str] | None = None) -> Path | None:
    """Plot every numeric per-step series (or ``keys``) of a metrics.jsonl against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not Path(metrics_path).exists():
        return None
    rows = [r for r in read_metrics(metrics_path) if "step" in r and "event" not in r]
    if not rows:
        return None
    skip = {"step", "lr", "img_per_s", "elapsed_s", "cpu_s"}
    names = keys or sorted({k for r in rows for k, v in r.items() if k not in skip and isinstance(v, (int, float))})
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), squeeze=False, sharex=True)
    for ax, name in zip(axes[:, 0], names, strict=True):
        pts = [(r["step"], r[name]) for r in rows if name in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
