"""Inputs for parity checks and benchmarks: random tensors shaped by a :class:`PartSpec`, and real images.

Real images are the first JPEGs of the Tiny ImageNet validation split (``../shared/data``), decoded to RGB
and centre-cropped to the model's image size with the project's preprocessing (``models.preprocess``), so the
parity check sees the pixels the server would.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.parts import PartSpec
from models.latent_norm import normalize_latents

DATA_ENV = "TOKSERVE_DATA_DIR"
VALIDATION = "tiny-imagenet-64/validation-00000-of-00001.parquet"


def data_dir() -> Path:
    """The shared data folder: ``$TOKSERVE_DATA_DIR`` or ``../shared/data`` beside the repository."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def real_images(n: int, size: int, path: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """The first ``n`` validation images as (n, 3, size, size) float32 in [-1, 1].

    Raises ``FileNotFoundError`` if the parquet file is missing.
    """
    import pyarrow.parquet as pq
    from PIL import Image

    from models.preprocess import center_crop_arr, to_model_input  # the preprocessing the server uses

    p = Path(path) if path is not None else data_dir() / VALIDATION
    if not p.exists():
        raise FileNotFoundError(f"{p}: real images for the parity check not found (set {DATA_ENV})")
    table = pq.ParquetFile(str(p)).read_row_group(0, columns=["image"])
    blobs = table.column("image").combine_chunks().field("bytes").to_pylist()[:n]
    arrs = [center_crop_arr(Image.open(io.BytesIO(blob)).convert("RGB"), size) for blob in blobs]
    return to_model_input(np.stack(arrs))


def random_inputs(spec: PartSpec, facts: dict[str, Any], batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs for ``spec`` at batch ``batch``, in each input's realistic range.

    images: U(-1, 1); tokens: N(vq_mean, vq_std^2); x: N(0, 1); t: U(0, time_scale); y: uniform over the
    classes and the null class; cfg_scale: U(1, 5).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in spec.inputs:
        shape = tuple(batch if d == "B" else int(d) for d in s.shape)
        if s.name == "images":
            v = torch.rand(shape, generator=g) * 2 - 1
        elif s.name == "tokens":
            v = torch.randn(shape, generator=g) * facts.get("vq_std", 1.0) + facts.get("vq_mean", 0.0)
        elif s.name == "t":
            v = torch.rand(shape, generator=g) * facts.get("time_scale", 1.0)
        elif s.name == "y":
            v = torch.randint(0, facts.get("num_classes", 1000) + 1, shape, generator=g)
        elif s.name == "cfg_scale":
            v = 1 + 4 * torch.rand(shape, generator=g)
        else:
            v = torch.randn(shape, generator=g)
        out.append(v.to(s.torch_dtype))
    return tuple(out)


def noised_latents(tokens: torch.Tensor, facts: dict[str, Any], tok_facts: dict[str, Any],
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Denoiser inputs from real tokens (B, L, D): normalised with the tokenizer's vq_mean/vq_std, mixed with
    noise at a random time (linear path), with random classes. Returns (x, t, y)."""
    g = torch.Generator().manual_seed(seed)
    b = tokens.shape[0]
    z = normalize_latents(tokens, tok_facts["vq_mean"], tok_facts["vq_std"])
    u = torch.rand(b, generator=g)
    x = (1 - u.view(-1, 1, 1)) * z + u.view(-1, 1, 1) * torch.randn(z.shape, generator=g)
    t = (u * facts.get("time_scale", 1.0)).float()
    y = torch.randint(0, facts.get("num_classes", 1000), (b,), generator=g)
    return x.float(), t, y


def enliven_(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """The server's random weights for a registry name (:func:`models.random_init.enliven`, global RNG), so
    an export of a name computes what the server serves under it (checked by tests/export)."""
    from models.random_init import enliven

    return enliven(model, std)


def random_weights_model(name: str, seed: int = 0) -> torch.nn.Module:
    """The registered configuration ``name`` with seeded random weights, enlivened (see :func:`enliven_`),
    in eval mode; the global RNG is left as it was."""
    import models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return enliven_(models.create_model(name)).eval()
