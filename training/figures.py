"""The README figures: a reconstruction grid (originals / tokenizers) and a class-conditional sample grid.

    python -m training figures --tokenizer weights/default/tokenizer --generator weights/default/generator \
        --out docs

Each row of the reconstruction grid is labelled (original, then each tokenizer); each row of the sample grid
is one class, labelled with its ImageNet name. Any continuous-latent generator family (SiT, DiT, MAR) works;
the sampler and its steps default to the generator config's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image, ImageDraw

from training.data import imagenet_classes, load_images, to_float, to_uint8
from training.plots import image_grid

SAMPLE_CLASSES = (207, 281, 1, 323, 779, 963, 951, 970)  # golden retriever, tabby, goldfish, monarch, ...


def labelled_rows(rows: list[torch.Tensor], labels: list[str], scale: int = 2, label_width: int = 130) -> Image.Image:
    """Stack uint8 image rows (each (N, 3, H, W)) with a text label on the left of each row."""
    grids = [image_grid(r, nrow=r.shape[0]) for r in rows]
    grids = [g.resize((g.width * scale, g.height * scale), Image.NEAREST) for g in grids]
    w = label_width + max(g.width for g in grids)
    out = Image.new("RGB", (w, sum(g.height for g in grids)), "white")
    draw = ImageDraw.Draw(out)
    y = 0
    for g, text in zip(grids, labels, strict=True):
        out.paste(g, (label_width, y))
        draw.text((6, y + g.height // 2 - 6), text[:20], fill="black")
        y += g.height
    return out


@torch.no_grad()
def reconstruction_figure(tokenizers: dict[str, nn.Module], n: int = 8, offset: int = 0) -> Image.Image:
    """Row 0: ``n`` validation images; then one row per tokenizer (name -> model)."""
    images = load_images("tiny-val", 64, max_images=offset + n).images[offset:]
    rows, labels = [images], ["original"]
    for name, tok in tokenizers.items():
        rows.append(to_uint8(tok.decode(tok.encode(to_float(images)))))
        labels.append(name)
    return labelled_rows(rows, labels)


@torch.no_grad()
def samples_figure(generator: nn.Module, tokenizer: nn.Module, classes=SAMPLE_CLASSES, per_class: int = 8, *,
                   cfg_scale: float, steps: int, sampler: str, seed: int = 0) -> Image.Image:
    from training.evaluate import generate

    names = {c["id"]: c["name"] for c in imagenet_classes()}
    images, _ = generate(generator, tokenizer, list(classes), per_class, cfg_scale=cfg_scale, steps=steps,
                         sampler_name=sampler, seed=seed)
    rows = [images[i * per_class : (i + 1) * per_class] for i in range(len(classes))]
    return labelled_rows(rows, [f"{c} {names.get(c, '')}" for c in classes])


def write_figures(tokenizer: str, generator: str | None, out: str | Path, *, cfg_scale: float = 2.0,
                  steps: int | None = None, sampler: str | None = None, taef2: bool = True) -> list[Path]:
    """``steps`` / ``sampler`` None: the generator config's (SiT / DiT: its sampler and steps; MAR: ``mar`` and
    ``num_iter``)."""
    import models
    from training.evaluate import load_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = models.load_pretrained(tokenizer).float()
    toks = {"default tokenizer": tok}
    if taef2:
        toks["TAEF2"] = load_tokenizer("taef2")
    paths = [out / "reconstructions.png"]
    reconstruction_figure(toks).save(paths[0])
    if generator:
        gen = models.load_pretrained(generator).float()
        paths.append(out / "samples.png")
        samples_figure(gen, tok, cfg_scale=cfg_scale, steps=steps or gen.config.steps,
                       sampler=sampler or gen.config.sampler).save(paths[1])
    return paths
