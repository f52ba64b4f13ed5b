"""Bytes <-> arrays at the edge of the server: images in and out, tensors on the wire (JSON, .npy,
safetensors). Everything here is synchronous and CPU-bound: the routes call it in the codec thread pool.

Every failure raises a :mod:`server.errors` error that names the problem (400 undecodable, 413 too large,
415 unsupported format, 422 wrong shape / dtype / NaN).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from models.preprocess import preprocess_image, to_model_input, to_uint8
from server.errors import BadRequest, InvalidValue, PayloadTooLarge, UnsupportedMediaType

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
IMAGE_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
NPY = "application/x-npy"
SAFETENSORS = "application/vnd.safetensors"
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# ---------------------------------------------------------------------------------------------- images in


def decode_base64(text: str, what: str = "image") -> bytes:
    if not isinstance(text, str):
        raise BadRequest(f"{what} must be a base64 string")
    if text.startswith("data:") and "," in text:  # tolerate data URLs
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64") from None


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """PNG / JPEG / WebP bytes -> an RGB PIL image, validated. 16-bit, grayscale, palette, CMYK and alpha
    images are converted (alpha composited over white); truncated files are refused (400); images over
    ``max_pixels`` or Pillow's decompression-bomb limit are refused (413) before their pixels are decoded."""
    if not data:
        raise BadRequest("empty image")
    limit = max_pixels if not Image.MAX_IMAGE_PIXELS else min(max_pixels, Image.MAX_IMAGE_PIXELS)
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise PayloadTooLarge(f"image refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise _unsupported_or_bad(data) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadRequest(f"corrupt image header: {e}") from None
    w, h = img.size
    if w * h > limit:
        raise PayloadTooLarge(f"image is {w}x{h} = {w * h} pixels; the limit is {limit}")
    if w < 1 or h < 1:
        raise BadRequest(f"image has no pixels ({w}x{h})")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise PayloadTooLarge(f"image refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadRequest(f"truncated or corrupt {img.format} image: {e}") from None
    return to_rgb(img)


def _unsupported_or_bad(data: bytes) -> Exception:
    try:
        other = Image.open(io.BytesIO(data))
        fmt = other.format
    except Exception:
        return BadRequest("not a decodable image: send PNG, JPEG or WebP")
    return UnsupportedMediaType(f"{fmt} images are not accepted: send PNG, JPEG or WebP")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16-bit grayscale is scaled (not clipped) to 8 bits; alpha over white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT:
        arr = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        raise UnsupportedMediaType("floating-point images are not supported: send 8- or 16-bit images")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def images_to_tensor(blobs: Sequence[bytes], image_size: int, preprocess: str, max_pixels: int) -> torch.Tensor:
    """Image files -> (B, 3, S, S) float32 in [-1, 1] for a tokenizer of size S."""
    arrays = [preprocess_image(decode_image(b, max_pixels=max_pixels), image_size, preprocess) for b in blobs]
    return to_model_input(arrays)


# ---------------------------------------------------------------------------------------------- images out


def encode_images(images: torch.Tensor, fmt: str, *, jpeg_quality: int = 90, webp_quality: int = 90,
                  png_compress_level: int = 3) -> list[bytes]:
    """(B, 3, H, W) float images in about [-1, 1] -> B files of ``fmt`` (png, jpeg, webp)."""
    out = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        pil = Image.fromarray(arr)
        if fmt == "png":
            pil.save(buf, format="PNG", compress_level=png_compress_level)
        elif fmt == "jpeg":
            pil.save(buf, format="JPEG", quality=jpeg_quality)
        elif fmt == "webp":
            pil.save(buf, format="WEBP", quality=webp_quality)
        else:
            raise InvalidValue(f"unknown image format {fmt!r}; use png, jpeg or webp")
        out.append(buf.getvalue())
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------------------------- tensors in


def tensor_from_json(obj: Any) -> np.ndarray:
    """``{"shape": [...], "dtype": "float32", "data": [flat row-major numbers]}`` -> an array of that dtype."""
    if not isinstance(obj, dict):
        raise BadRequest('a JSON tensor is an object {"shape", "dtype", "data"}')
    missing = [k for k in ("shape", "data") if k not in obj]
    if missing:
        raise InvalidValue(f"JSON tensor lacks {missing}")
    shape, data, dtype = obj["shape"], obj["data"], obj.get("dtype", "float32")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise InvalidValue(f"shape must be a list of non-negative integers, got {shape!r}")
    if dtype not in FLOAT_DTYPES + INT_DTYPES:
        raise InvalidValue(f"unsupported dtype {dtype!r}; use one of {FLOAT_DTYPES + INT_DTYPES}")
    if not isinstance(data, list):
        raise InvalidValue("data must be a flat list of numbers (row-major)")
    try:
        flat = np.asarray(data, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InvalidValue("data must contain only numbers") from None
    need = math.prod(shape)
    if flat.size != need:
        raise InvalidValue(f"data has {flat.size} numbers but shape {shape} needs {need}")
    if dtype in INT_DTYPES:
        if not np.all(np.isfinite(flat)) or np.any(flat != np.round(flat)):
            raise InvalidValue(f"dtype {dtype} needs integer data")
        return flat.astype(dtype).reshape(shape)
    if dtype == "bfloat16":
        dtype = "float32"
    with np.errstate(over="ignore"):
        return flat.astype(dtype).reshape(shape)


def tensor_from_npy(data: bytes) -> np.ndarray:
    if data[:2] == b"PK":
        raise BadRequest("an .npz archive was sent; send a single .npy array")
    if not data.startswith(b"\x93NUMPY"):
        raise BadRequest("not a .npy file (no \\x93NUMPY header)")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise InvalidValue("object (pickled) arrays are refused; send a numeric array") from None
        raise BadRequest(f"not a valid .npy file: {e}") from None
    except (OSError, EOFError) as e:
        raise BadRequest(f"not a valid .npy file: {e}") from None
    if not isinstance(arr, np.ndarray):
        raise BadRequest("not a single .npy array")
    return arr


def tensor_from_safetensors(data: bytes, name: str = "tokens") -> torch.Tensor:
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, OSError) as e:
        raise BadRequest(f"not a valid safetensors file: {e}") from None
    if name in tensors:
        return tensors[name]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise InvalidValue(f"safetensors file must hold one tensor named {name!r}; it holds {sorted(tensors)}")


def validate_tokens(tokens: np.ndarray | torch.Tensor, token_shape: tuple[int, ...], *, model: str,
                    max_rows: int, codebook_size: int | None = None) -> torch.Tensor:
    """Check tokens against a tokenizer's token shape: (B, *token_shape) or token_shape. Continuous
    tokenizers (``codebook_size`` None): floating, finite; returns float32. Discrete ones: integer codes in
    [0, codebook_size) (floats holding whole numbers, as JSON clients often send, are accepted); returns
    int64. Every problem raises InvalidValue (422) naming it."""
    t = torch.from_numpy(np.ascontiguousarray(tokens)) if isinstance(tokens, np.ndarray) else tokens
    dtype = str(t.dtype).removeprefix("torch.")
    shape = tuple(token_shape)
    if t.ndim == len(shape):
        t = t.unsqueeze(0)
    dims = ", ".join(map(str, shape))
    if t.ndim != len(shape) + 1 or tuple(t.shape[1:]) != shape:
        raise InvalidValue(f"tokens of shape {tuple(tokens.shape)} do not fit {model}: expected (B, {dims}) "
                           f"or ({dims}{',' if len(shape) == 1 else ''})")
    if t.shape[0] < 1:
        raise InvalidValue("tokens have no rows (B = 0)")
    if t.shape[0] > max_rows:
        raise InvalidValue(f"{t.shape[0]} rows of tokens; at most {max_rows} per request")
    if codebook_size is not None:
        return _validate_codes(t, dtype, model, codebook_size)
    if not t.is_floating_point():
        raise InvalidValue(f"tokens of dtype {dtype} are not accepted by {model} (continuous tokens): send "
                           "float32 (float16, bfloat16 and float64 are converted)")
    t = t.to(torch.float32)
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int((~finite).sum()) - n_nan
        first = tuple(int(i) for i in (~finite).nonzero()[0])
        parts = [f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "infinite (or out of float32 range)"))
                 if n]
        raise InvalidValue(f"tokens contain {' and '.join(parts)} values (first at index {first})")
    return t.contiguous()


def _validate_codes(t: torch.Tensor, dtype: str, model: str, codebook_size: int) -> torch.Tensor:
    if t.dtype == torch.bool or t.is_complex():
        raise InvalidValue(f"codes of dtype {dtype} are not accepted by {model}: send integer codes (int64)")
    if t.is_floating_point():
        whole = torch.isfinite(t) & (t == torch.round(t))
        if not bool(whole.all()):
            first = tuple(int(i) for i in (~whole).nonzero()[0])
            raise InvalidValue(f"{model} is a discrete tokenizer: codes must be integers, got a non-integer "
                               f"value at index {first}")
        if t.numel() and float(t.abs().max()) >= 2**53:
            raise InvalidValue(f"codes must lie in [0, {codebook_size})")
    t = t.to(torch.int64)
    bad = (t < 0) | (t >= codebook_size)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise InvalidValue(f"codes must lie in [0, {codebook_size}) for {model}; {int(bad.sum())} do not "
                           f"(first at index {first}: {int(t[first])})")
    return t.contiguous()


# ---------------------------------------------------------------------------------------------- tensors out


def tensor_to_json(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "data": t.detach().cpu().reshape(-1).tolist()}


def tensor_to_npy(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, t.detach().cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


def tensor_to_safetensors(t: torch.Tensor, name: str = "tokens") -> bytes:
    return st_save({name: t.detach().cpu().contiguous()})
