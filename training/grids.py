"""Reconstruction and sample grids of the shipped default models: ``python -m training.grids`` writes
docs/reconstructions.png (top: validation images, bottom: the tokenizer's round trip) and docs/samples.png
(rows: classes, columns: seeds 0-5; SDE, 50 steps, cfg 1.75 on [0, 0.7])."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

import models
from models.preprocess import to_uint8
from models.sampling import get_sampler
from models.sampling.base import SampleRequest, run_to_completion

VAL = "../shared/data/tiny-imagenet-64/validation-00000-of-00001.parquet"
CLASSES = (207, 1, 94, 980)  # golden retriever, goldfish, hummingbird, volcano: kept where trained


def _grid(rows: list[torch.Tensor], scale: int = 2) -> Image.Image:
    """rows of (N, 3, H, W) images in [-1, 1] -> one PIL grid, nearest-upscaled ``scale`` times."""
    arr = np.concatenate([np.concatenate(list(to_uint8(r)), axis=1) for r in rows], axis=0)
    img = Image.fromarray(arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


@torch.no_grad()
def main(tokenizer: str = "weights/default/tokenizer", generator: str = "weights/default/generator") -> None:
    torch.set_num_threads(1)
    tok, gen = models.load_pretrained(tokenizer), models.load_pretrained(generator)
    rows = pq.read_table(VAL).slice(0, 8).column("image").to_pylist()
    x = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(r["bytes"])).convert("RGB"))).permute(2, 0, 1)
                     for r in rows]).float() / 127.5 - 1
    _grid([x, tok.decode(tok.encode(x))]).save("docs/reconstructions.png")
    trained = set(gen.config.trained_classes) or set(CLASSES)
    classes = [c for c in CLASSES if c in trained] or sorted(trained)[:4]
    sampler = get_sampler("sde", gen.config)
    grid_rows = []
    for c in classes:
        reqs = [SampleRequest(class_id=c, seed=s, steps=50, cfg_scale=1.75, guidance_high=0.7,
                              path_type=gen.config.path_type) for s in range(6)]
        z = run_to_completion(sampler, gen, reqs, (gen.config.num_tokens, gen.config.token_dim))
        grid_rows.append(tok.decode(tok.denormalize_latents(z.float())))
    _grid(grid_rows).save("docs/samples.png")
    print(f"docs/reconstructions.png, docs/samples.png (classes {classes})")


if __name__ == "__main__":
    main()
