"""Bytes <-> arrays at the edge of the server: images in and out, tensors on the wire (JSON, .npy,
safetensors). Everything here is synchronous and CPU-bound: the routes call it in the codec thread pool.

Every failure raises a :mod:`server.errors` error that names the problem (400 undecodable, 413 too large,
415 unsupported format, 422 wrong shape / dtype / NaN).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.lib.format as npformat
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from models.preprocess import preprocess_image, to_model_input, to_uint8
from server.errors import BadRequest, InvalidValue, PayloadTooLarge, TokservError, UnsupportedMediaType

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
IMAGE_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
NPY = "application/x-npy"
SAFETENSORS = "application/vnd.safetensors"
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
MAX_NDIM = 8  # tensors on the wire: (B, *token shape) needs at most 4
NPY_MAX_HEADER = 10_000  # bytes of a .npy header (numpy's own default bound)
ST_MAX_HEADER = 1 << 20  # bytes of a safetensors JSON header

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
    return load_image(open_image(data, max_pixels=max_pixels))


def open_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Read an image's header only (no pixels): 400 / 413 / 415 as :func:`decode_image`."""
    if not data:
        raise BadRequest("empty image")
    limit = max_pixels if not Image.MAX_IMAGE_PIXELS else min(max_pixels, Image.MAX_IMAGE_PIXELS)
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise PayloadTooLarge(f"image refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise _unsupported_or_bad(data) from None
    except Exception as e:  # Pillow's header parsers on hostile bytes: any failure is a corrupt header
        raise BadRequest(f"corrupt image header: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > limit:
        raise PayloadTooLarge(f"image is {w}x{h} = {w * h} pixels; the limit is {limit}")
    if w < 1 or h < 1:
        raise BadRequest(f"image has no pixels ({w}x{h})")
    return img


def load_image(img: Image.Image) -> Image.Image:
    """Decode an opened image's pixels -> RGB (EXIF orientation applied)."""
    fmt = img.format
    try:
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))
    except TokservError:
        raise
    except Image.DecompressionBombError as e:
        raise PayloadTooLarge(f"image refused as a decompression bomb: {e}") from None
    except MemoryError:
        raise PayloadTooLarge("image too large to decode") from None
    except Exception as e:  # truncated / corrupt data, broken EXIF, odd modes: Pillow raises many kinds
        raise BadRequest(f"truncated or corrupt {fmt} image: {type(e).__name__}: {e}") from None


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


def images_to_tensor(blobs: Sequence[bytes], image_size: int, preprocess: str, max_pixels: int,
                     max_request_pixels: int | None = None) -> torch.Tensor:
    """Image files -> (B, 3, S, S) float32 in [-1, 1] for a tokenizer of size S. Every header is read (and
    the per-image and per-request pixel limits checked, 413) before any image is decoded; each image is
    decoded, preprocessed and dropped before the next, so memory holds one full-size image at a time."""
    headers = [open_image(b, max_pixels=max_pixels) for b in blobs]
    total = sum(img.size[0] * img.size[1] for img in headers)
    if preprocess == "center-crop":  # the short side is scaled to S: the long one grows by S / short
        for i, img in enumerate(headers):
            w, h = img.size
            if image_size * image_size * max(w, h) > max_pixels * min(w, h):
                raise PayloadTooLarge(f"image {i} ({w}x{h}) is too elongated for center-crop at {image_size}: its "
                                      f"scaled copy would exceed {max_pixels} pixels (use preprocess=resize)")
    if max_request_pixels is not None and total > max_request_pixels:
        raise PayloadTooLarge(f"the request's images hold {total} pixels; the limit is {max_request_pixels} per "
                              "request")
    arrays = []
    for i in range(len(headers)):
        img, headers[i] = headers[i], None  # type: ignore[call-overload]
        arrays.append(preprocess_image(load_image(img), image_size, preprocess))
        del img
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


# ---------------------------------------------------------------------------------------------- JSON bodies


def parse_json(body: bytes, what: str = "JSON body") -> Any:
    """Client bytes -> a JSON value, bounded: nesting past the interpreter's recursion limit (about 1,000
    levels), integers of more than 4,300 digits and invalid UTF-8 are refused with 400 and a reason (never a
    RecursionError / ValueError escaping as a 500). ``NaN`` / ``Infinity`` literals parse; the fields that
    take numbers refuse them."""
    if not body.strip():
        raise BadRequest(f"empty {what}")
    try:
        return json.loads(body)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    except UnicodeDecodeError:
        raise BadRequest(f"{what} is not valid UTF-8") from None
    except ValueError as e:  # int(str) past sys.get_int_max_str_digits()
        if "digits" in str(e):
            raise BadRequest(f"{what} holds an integer of more than {sys.get_int_max_str_digits()} digits") from None
        raise BadRequest(f"malformed JSON: {e}") from None


# ---------------------------------------------------------------------------------------------- tensors in


def tensor_from_json(obj: Any) -> np.ndarray:
    """``{"shape": [...], "dtype": "float32", "data": [flat row-major numbers]}`` -> an array of that dtype.
    The shape is checked (at most :data:`MAX_NDIM` non-negative integers, as many elements as ``data``)
    before anything is allocated; integer dtypes refuse values outside their range (never wrap around)."""
    if not isinstance(obj, dict):
        raise BadRequest('a JSON tensor is an object {"shape", "dtype", "data"}')
    missing = [k for k in ("shape", "data") if k not in obj]
    if missing:
        raise InvalidValue(f"JSON tensor lacks {missing}")
    shape, data, dtype = obj["shape"], obj["data"], obj.get("dtype", "float32")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise InvalidValue(f"shape must be a list of non-negative integers, got {_short(shape)}")
    if len(shape) > MAX_NDIM:
        raise InvalidValue(f"shape has {len(shape)} dimensions; at most {MAX_NDIM}")
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES + INT_DTYPES:
        raise InvalidValue(f"unsupported dtype {_short(dtype)}; use one of {FLOAT_DTYPES + INT_DTYPES}")
    if not isinstance(data, list):
        raise InvalidValue("data must be a flat list of numbers (row-major)")
    need = math.prod(shape)
    if len(data) != need:
        raise InvalidValue(f"data has {len(data)} numbers but shape {shape} needs {need}")
    try:
        flat = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidValue("data must contain only numbers (a flat list, row-major)") from None
    except OverflowError:
        raise InvalidValue("data holds a number out of range") from None
    if flat.ndim != 1:
        raise InvalidValue("data must be a flat list of numbers (row-major), not nested lists")
    if dtype in INT_DTYPES:
        if not np.all(np.isfinite(flat)) or np.any(flat != np.round(flat)):
            raise InvalidValue(f"dtype {dtype} needs integer data")
        check_int_range(flat, np.dtype(dtype))
        return flat.astype(dtype).reshape(shape)
    if dtype == "bfloat16":
        dtype = "float32"
    with np.errstate(over="ignore"):
        return flat.astype(dtype).reshape(shape)


def check_int_range(values: np.ndarray, dtype: np.dtype) -> None:
    """Integers (held as float64) must fit ``dtype``: out-of-range values are refused, never wrapped."""
    if not values.size:
        return
    info = np.iinfo(dtype)
    lo, hi = float(info.min), float(info.max)
    bad = (values < lo) | ((values >= 2.0 ** 63) if dtype == np.int64 else (values > hi))
    if bool(bad.any()):
        first = int(np.flatnonzero(bad)[0])
        raise InvalidValue(f"value {values[first]:.0f} (flat index {first}) does not fit dtype {dtype.name} "
                           f"[{info.min}, {info.max}]")


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


# Which arrays the binary formats may carry: plain numbers, either byte order. Everything else (objects,
# strings, structured records, datetimes, complex, bool) is refused before its data is read.
_NPY_KINDS = {"f": (2, 4, 8), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8)}


def tensor_from_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` file -> a native-byte-order numeric array. The header is parsed on its own (bounded size),
    then dtype, dimensions and the byte count the shape implies are checked before the data is touched;
    the array is a view of the body (no allocation a lying header could inflate)."""
    if data[:2] == b"PK":
        raise BadRequest("an .npz archive was sent; send a single .npy array")
    if not data.startswith(b"\x93NUMPY"):
        raise BadRequest("not a .npy file (no \\x93NUMPY header)")
    f = io.BytesIO(data)
    try:
        version = npformat.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(f, max_header_size=NPY_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(f, max_header_size=NPY_MAX_HEADER)
        else:
            raise BadRequest(f".npy format version {version[0]}.{version[1]} is not supported; use 1.0 or 2.0")
    except TokservError:
        raise
    except Exception as e:  # numpy's header parser on hostile bytes: any failure is a bad header
        raise BadRequest(f"not a valid .npy header: {type(e).__name__}: {_short(str(e), 160)}") from None
    if dtype.hasobject:
        raise InvalidValue("object (pickled) arrays are refused; send a numeric array")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize not in _NPY_KINDS.get(dtype.kind, ()):
        raise InvalidValue(f".npy dtype {_short(dtype.str)} is not accepted: send float16/32/64 tokens or integer "
                           "codes")
    if len(shape) > MAX_NDIM:
        raise InvalidValue(f"the array has {len(shape)} dimensions; at most {MAX_NDIM}")
    count = math.prod(shape)
    offset = f.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise BadRequest(f"the .npy header declares shape {tuple(shape)} of {dtype.name} ({count * dtype.itemsize} "
                         f"bytes) but {len(data) - offset} bytes follow it")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset) if count else np.empty(0, dtype)
    arr = flat.reshape(shape, order="F" if fortran else "C")
    return np.array(arr, dtype=dtype.newbyteorder("="), order="C")  # a writable, native-order copy


_ST_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8,
              "U8": 1, "U16": 2, "U32": 4, "U64": 8}


def tensor_from_safetensors(data: bytes, name: str = "tokens") -> torch.Tensor | np.ndarray:
    """A safetensors file holding one tensor (named ``name``, or the only one) -> that tensor. The header is
    read and checked first (size, one tensor, a numeric dtype, at most :data:`MAX_NDIM` dimensions, offsets
    matching the shape); unsigned integers wider than 8 bits come back as a numpy array."""
    if len(data) < 8:
        raise BadRequest("not a valid safetensors file: shorter than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > ST_MAX_HEADER:
        raise BadRequest(f"not a valid safetensors file: header of {n} bytes in a body of {len(data)}")
    header = parse_json(data[8:8 + n], "safetensors header")
    if not isinstance(header, dict):
        raise BadRequest("not a valid safetensors file: the header is not a JSON object")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if name in entries:
        key = name
    elif len(entries) == 1:
        key = next(iter(entries))
    else:
        raise InvalidValue(f"safetensors file must hold one tensor named {name!r}; it holds "
                           f"{_short(sorted(entries))}")
    info = entries[key]
    if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
        raise BadRequest(f"not a valid safetensors file: bad header entry for {key!r}")
    dtype, shape = info.get("dtype"), info["shape"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise InvalidValue(f"safetensors dtype {_short(dtype)} is not accepted: send F16/BF16/F32/F64 tokens or "
                           "integer codes")
    if len(shape) > MAX_NDIM:
        raise InvalidValue(f"the tensor has {len(shape)} dimensions; at most {MAX_NDIM}")
    try:
        tensors = st_load(data)
    except Exception as e:  # the Rust parser on hostile bytes (SafetensorError, ValueError, ...)
        raise BadRequest(f"not a valid safetensors file: {_short(str(e), 160)}") from None
    t = tensors[key]
    if t.dtype in (torch.uint16, torch.uint32, torch.uint64):
        return t.numpy()  # torch has few ops for these: range checks run in numpy
    return t


def validate_tokens(tokens: np.ndarray | torch.Tensor, token_shape: tuple[int, ...], *, model: str,
                    max_rows: int, codebook_size: int | None = None) -> torch.Tensor:
    """Check tokens against a tokenizer's token shape: (B, *token_shape) or token_shape. Continuous
    tokenizers (``codebook_size`` None): floating, finite; returns float32. Discrete ones: integer codes in
    [0, codebook_size) (floats holding whole numbers, as JSON clients often send, are accepted); returns
    int64. Every problem raises InvalidValue (422) naming it."""
    if isinstance(tokens, np.ndarray):
        dtype = tokens.dtype.name
        if tokens.dtype.kind == "u" and tokens.dtype.itemsize > 1:  # torch has few uint16/32/64 ops
            if tokens.size and int(tokens.max()) > np.iinfo(np.int64).max:
                raise InvalidValue(f"codes of {dtype} must lie below 2**63")
            tokens = tokens.astype(np.int64)
        t = torch.from_numpy(np.ascontiguousarray(tokens))
    else:
        t = tokens
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
