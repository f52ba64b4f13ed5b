"""Turn the image inputs the SDK accepts into encoded bytes, and response bytes back into PIL images."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]
"""An image: a file path, encoded bytes (PNG / JPEG / WebP / anything Pillow reads), a PIL image, or an
``(H, W, 3)`` / ``(H, W)`` / ``(H, W, 4)`` uint8 array."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def sniff_format(data: bytes) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"webp"`` from the magic bytes, else ``None``."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def to_image_bytes(image: ImageInput) -> tuple[bytes, str]:
    """Encode one image input as ``(bytes, mime type)`` the server accepts.

    PNG / JPEG / WebP bytes and files are sent unchanged (the server does the decoding, cropping and
    validation); other formats Pillow can read are re-encoded as PNG; PIL images and arrays become PNG.
    """
    if isinstance(image, (str, os.PathLike)):
        data = Path(image).read_bytes()
        return _bytes_as_upload(data, origin=str(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _bytes_as_upload(bytes(image), origin="bytes")
    if isinstance(image, Image.Image):
        return _png(image), _MIME["png"]
    if isinstance(image, np.ndarray):
        return _png(array_to_pil(image)), _MIME["png"]
    raise TypeError(f"unsupported image input {type(image).__name__}; give a path, bytes, PIL image or array")


def array_to_pil(array: np.ndarray) -> Image.Image:
    """A PIL image from an ``(H, W, 3)``, ``(H, W, 4)``, ``(H, W, 1)`` or ``(H, W)`` uint8 array."""
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (H, W, C); got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(array, mode="L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(array, mode="RGB" if array.shape[2] == 3 else "RGBA")
    raise ValueError(f"image arrays must be (H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}")


def split_images(images: object) -> list[ImageInput]:
    """One image or a sequence of them as a list; a 4-D uint8 array ``(B, H, W, C)`` is B images."""
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]  # type: ignore[list-item]


def load_image(data: bytes) -> Image.Image:
    """Decode image bytes from the server into a loaded PIL image."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _bytes_as_upload(data: bytes, origin: str) -> tuple[bytes, str]:
    fmt = sniff_format(data)
    if fmt is not None:
        return data, _MIME[fmt]
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds
        raise ValueError(f"{origin}: not an image Pillow can read ({exc})") from exc
    return _png(img), _MIME["png"]


def _png(img: Image.Image) -> bytes:
    if img.mode not in ("RGB", "RGBA", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
