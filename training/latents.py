"""Tokenizer latents for generator training: statistics (``vq_mean`` / ``vq_std``) and a pre-encoded cache.

The generator models normalised tokens ``(z - vq_mean) / vq_std``. Both scalars are measured once on
training images (:func:`measure_latent_stats`) and written into the tokenizer's ``config.json``
(:func:`write_latent_stats`) so that serving un-normalises with the same numbers. Encoding the training set
once (:func:`encode_cached`, reused by later runs with the same key) spares the CPU a tokenizer forward per generator step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from models.hub import CONFIG_NAME
from training.data import ImageSet, to_float
from training.progress import note, progress


@torch.no_grad()
def encode_images(tokenizer: nn.Module, images: torch.Tensor, batch_size: int = 64, *, flip: bool = False,
                  device: torch.device | str = "cpu", desc: str | None = None) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> raw tokens (N, L, D) float32 (mirrored copies appended when ``flip``),
    with a progress bar named ``desc`` (None: none)."""
    tokenizer.eval()
    out = []
    src = torch.cat([images, images.flip(-1)]) if flip else images
    with progress(total=src.shape[0], desc=desc) as bar:
        for i in range(0, src.shape[0], batch_size):
            out.append(tokenizer.encode(to_float(src[i : i + batch_size]).to(device)).float().cpu())
            bar.update(out[-1].shape[0])
    return torch.cat(out)


def encode_image_set(tokenizer: nn.Module, images: ImageSet, batch_size: int = 64, *, flip: bool = False,
                     device: torch.device | str = "cpu", desc: str | None = "encoding latents") -> ImageSet:
    """:func:`encode_images` with the labels (repeated when ``flip``): ``ImageSet.images`` holds the tokens."""
    tokens = encode_images(tokenizer, images.images, batch_size, flip=flip, device=device, desc=desc)
    return ImageSet(tokens, torch.cat([images.labels, images.labels]) if flip else images.labels)


@dataclasses.dataclass
class LatentStats:
    """Scalar mean / std of all token values (the SoftVQ convention), over ``n`` images."""

    vq_mean: float
    vq_std: float
    n: int

    @classmethod
    def of(cls, tokens: torch.Tensor) -> LatentStats:
        t = tokens.double()
        return cls(float(t.mean()), float(t.std()), int(tokens.shape[0]))


def measure_latent_stats(tokenizer: nn.Module, images: ImageSet, batch_size: int = 64,
                         device: torch.device | str = "cpu") -> LatentStats:
    return LatentStats.of(encode_images(tokenizer, images.images, batch_size, device=device,
                                        desc="encoding (latent statistics)"))


def write_latent_stats(folder: str | os.PathLike[str], stats: LatentStats) -> dict:
    """Set ``vq_mean`` / ``vq_std`` in ``folder/config.json`` (other fields untouched); returns the config."""
    path = Path(folder) / CONFIG_NAME
    cfg = json.loads(path.read_text())
    if "vq_mean" not in cfg or "vq_std" not in cfg:
        raise ValueError(f"{path}: the tokenizer config has no vq_mean / vq_std fields")
    cfg["vq_mean"], cfg["vq_std"] = stats.vq_mean, stats.vq_std
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def has_latent_stats(tokenizer: nn.Module) -> bool:
    """False while the config still holds the identity defaults (mean 0, std 1)."""
    cfg = tokenizer.config
    return not (getattr(cfg, "vq_mean", 0.0) == 0.0 and getattr(cfg, "vq_std", 1.0) == 1.0)


def weights_fingerprint(folder: str | os.PathLike[str]) -> str:
    """Short hash of a serving folder's weight files (sizes + mtimes), naming a latent cache."""
    h = hashlib.sha1()
    for p in sorted(Path(folder).glob("*.safetensors")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def encode_cached(cache: str | os.PathLike[str], *, key: str, encode: Callable[[], ImageSet], field: str = "tokens",
                  dtype: torch.dtype | None = torch.float16, what: str = "latent") -> ImageSet:
    """Tokens and labels read from ``cache`` when it was written under the same ``key`` (one line says so), else
    ``encode()`` (which loads and encodes whatever it needs: nothing is loaded on a hit) written there as
    ``{key, <field> (as dtype), labels}``. ``key`` names everything the tokens depend on: the tokenizer's weights
    (:func:`weights_fingerprint`) and the data settings. The returned ``ImageSet.images`` holds the tokens.
    Also the code caches of MaskGIT and VAR (``field="codes"``, ``dtype=None``: integer codes kept as they are)."""
    cache = Path(cache)
    if cache.exists():
        t0 = time.time()
        d = torch.load(cache, weights_only=True)
        if d.get("key") == key and field in d:
            note(f"{what} cache {cache}: reused ({len(d['labels'])} {what}s, same tokenizer and data; "
                 f"{time.time() - t0:.1f} s), nothing to encode")
            return ImageSet(d[field], d["labels"])
        note(f"{what} cache {cache}: made with another tokenizer or data selection; encoding again")
    else:
        note(f"{what} cache {cache}: none yet; encoding")
    out = encode()
    tokens = out.images if dtype is None else out.images.to(dtype)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"key": key, field: tokens, "labels": out.labels}, tmp)
    os.replace(tmp, cache)
    note(f"{what} cache {cache}: written ({len(out.labels)} {what}s)")
    return ImageSet(tokens, out.labels)
