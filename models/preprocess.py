"""Image pre- and post-processing shared by training, evaluation and serving (one definition, no drift).

Pure PIL / numpy / torch. The tokenizers take (B, 3, H, W) float32 in [-1, 1] and give back unclamped images
in about [-1, 1]:

    arr = center_crop_arr(pil_rgb, 256)          # (256, 256, 3) uint8, the reference evaluation crop
    x = to_model_input([arr])                    # (1, 3, 256, 256) float32 in [-1, 1]
    pixels = to_uint8(tokenizer.decode(tokens))  # (B, H, W, 3) uint8
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

Preprocess = Literal["center-crop", "resize"]
PREPROCESS_MODES: tuple[str, ...] = ("center-crop", "resize")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM centre crop, as in the reference evaluation (FORMATS.md 1.5): halve with BOX resampling while the
    short side is at least ``2 * image_size``, resize with BICUBIC so the short side is ``image_size``
    (each side scaled and rounded), then take the centre square. Returns (S, S, 3) uint8."""
    img = pil_image.convert("RGB") if pil_image.mode != "RGB" else pil_image
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.Resampling.BOX)
    scale = image_size / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)),
                     resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def resize_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Plain BICUBIC resize to ``image_size`` x ``image_size`` (aspect ratio not kept). (S, S, 3) uint8."""
    img = pil_image.convert("RGB") if pil_image.mode != "RGB" else pil_image
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
    return np.asarray(img).copy()


def preprocess_image(pil_image: Image.Image, image_size: int, mode: str = "center-crop") -> np.ndarray:
    """``center-crop`` (:func:`center_crop_arr`, default) or ``resize`` (:func:`resize_arr`)."""
    if mode == "center-crop":
        return center_crop_arr(pil_image, image_size)
    if mode == "resize":
        return resize_arr(pil_image, image_size)
    raise ValueError(f"unknown preprocessing {mode!r}; use one of {PREPROCESS_MODES}")


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, H, W) in [-1, 1]: ToTensor then Normalize(0.5, 0.5), i.e.
    ``(x / 255 - 0.5) / 0.5`` (FORMATS.md 1.5). The one definition used by serving and training."""
    return images.float().div(255.0).sub(0.5).div(0.5)  # not in place: a float input is not copied by .float()


def to_model_input(arrays: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) or (B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1] (:func:`uint8_to_float`)."""
    arr = np.stack(list(arrays)) if not isinstance(arrays, np.ndarray) else arrays
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected (B, H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    arr = np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy()  # torch wants writable memory
    return uint8_to_float(torch.from_numpy(arr).permute(0, 3, 1, 2))


def to_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float images in about [-1, 1] -> (B, 3, H, W) uint8 on the same device.

    The one pixel convention of the project (training, evaluation, serving, export parity): clamp
    ``round((x + 1) * 127.5)`` to [0, 255], with ``torch.round`` (round half to even). The official evaluation
    maps ``(x + 1) / 2``, clips and rounds the same way (FORMATS-MAR-XQV.md 1.6); the model-card PSNR is
    therefore measured on the pixels the server returns.
    """
    return images.detach().float().add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float images in about [-1, 1] -> (B, H, W, 3) uint8 numpy: :func:`to_uint8_nchw`,
    moved to the CPU and laid out channel-last for image files."""
    return to_uint8_nchw(images).cpu().permute(0, 2, 3, 1).contiguous().numpy()


__all__ = [
    "PREPROCESS_MODES",
    "Preprocess",
    "center_crop_arr",
    "preprocess_image",
    "resize_arr",
    "to_model_input",
    "to_uint8",
    "to_uint8_nchw",
    "uint8_to_float",
]
