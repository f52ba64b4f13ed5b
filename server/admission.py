"""Admission: refuse work before doing it. A request is admitted (or answered 413 / 429 at once) on the
event loop, from its size alone, before its images are decoded or its tensors parsed:

* **capacity**: jobs waiting in the queue of its kind plus requests of that kind still being prepared
  (decoding) must stay under ``QUEUE_CAPACITY``, so a burst cannot pile decodes up behind a full queue (429);
* **pixels per image and per request**: read from the image headers (a few bytes, no decoding):
  ``MAX_IMAGE_PIXELS`` per image and ``MAX_REQUEST_PIXELS`` per request (413);
* **pixels being decoded**: large requests (more than :data:`server.codec_pool.LIGHT_COST` bytes of pixels)
  share ``MAX_DECODE_PIXELS`` (429 when it is taken; one request alone may always use it). Small requests
  skip this budget (capacity bounds them) and are decoded on the codec pool's light lane.

The same checks run again in the codec thread on Pillow's own reading of each header
(:func:`server.codecs.images_to_tensor`), so a header this module cannot read still meets the limits.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import torch
from PIL import Image

from models.preprocess import preprocess_image, to_model_input
from server.codec_pool import LIGHT_COST
from server.codecs import (
    images_to_tensor,
    tensor_from_json,
    tensor_from_npy,
    tensor_from_safetensors,
    validate_tokens,
)
from server.engine.specs import ModelSpec
from server.errors import PayloadTooLarge, QueueFull
from server.queue.base import job_kind
from server.settings import Settings

_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_MAX_SEGMENTS = 1024
PEEK_BYTES = 256 * 1024  # of a raw image body, read before admission (room for EXIF / ICC segments)


def image_dims(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG or WebP header without decoding anything (bounded: at most
    1,024 JPEG segments are skipped); None when the header cannot be read here."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return w, h
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L" and data[20:21] == b"\x2f":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
            return None
        if data[:2] == b"\xff\xd8":
            return _jpeg_dims(data)
    except struct.error:
        return None
    return None


def _jpeg_dims(data: bytes) -> tuple[int, int] | None:
    i = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        while i < len(data) and data[i] == 0xFF and i + 1 < len(data) and data[i + 1] == 0xFF:
            i += 1  # fill bytes
        if i + 4 > len(data) or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in _JPEG_SOF:
            if i + 9 > len(data):
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        if marker == 0xD9 or marker == 0xDA:  # end of image / start of scan before a frame header
            return None
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


class Admission:
    """The admission state of one API process (touched only on its event loop)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.preparing: Counter[str] = Counter()
        self.decode_pixels = 0

    def pixels_of(self, blobs: Sequence[bytes]) -> list[int]:
        """Pixels of each image for the decode budget (413 for one over ``MAX_IMAGE_PIXELS``, or a request
        over ``MAX_REQUEST_PIXELS``). A header not readable here counts as ``MAX_IMAGE_PIXELS`` for the budget
        (not for the 413: Pillow judges it when it opens it)."""
        s = self.settings
        pixels, known = [], 0
        for i, blob in enumerate(blobs):
            dims = image_dims(blob)
            if dims is None:
                pixels.append(s.max_image_pixels)
                continue
            n = dims[0] * dims[1]
            if n > s.max_image_pixels:
                raise PayloadTooLarge(f"image {i} is {dims[0]}x{dims[1]} = {n} pixels; the limit is "
                                      f"{s.max_image_pixels}")
            pixels.append(n)
            known += n
        if known > s.max_request_pixels:
            raise PayloadTooLarge(f"the request's images hold {known} pixels; the limit is "
                                  f"{s.max_request_pixels} per request")
        return pixels

    @contextmanager
    def admit(self, kind: str, waiting: int, pixels: int = 0) -> Iterator[None]:
        """Hold a place among the requests of ``kind`` being prepared (and ``pixels`` of the decode budget)
        while the block runs; 429 at once when the queue or the budget is full."""
        s = self.settings
        if waiting + self.preparing[kind] >= s.queue_capacity:
            raise QueueFull(f"queue {kind!r} is full ({s.queue_capacity} waiting or being prepared); retry "
                            "later", retry_after=s.retry_after_s)
        heavy = 3 * pixels > LIGHT_COST
        if heavy and self.decode_pixels and self.decode_pixels + pixels > s.max_decode_pixels:
            raise QueueFull(f"{self.decode_pixels} pixels are being decoded (the limit is {s.max_decode_pixels}); "
                            "retry later", retry_after=s.retry_after_s)
        self.preparing[kind] += 1
        if heavy:
            self.decode_pixels += pixels
        try:
            yield
        finally:
            self.preparing[kind] -= 1
            if not self.preparing[kind]:
                del self.preparing[kind]
            if heavy:
                self.decode_pixels -= pixels


async def decode_images(state: object, model: str, image_size: int, blobs: Sequence[bytes],
                        preprocess: str) -> torch.Tensor:
    """Admit an encode of ``blobs`` on ``model`` (413 / 429 before any decoding), then decode them in the
    codec pool (small requests on its light lane): (B, 3, S, S) float32 in [-1, 1]."""
    async with admit_encode(state, model, blobs):
        return await _decode(state, blobs, image_size, preprocess)


@asynccontextmanager
async def admit_encode(state: object, model: str, headers: Sequence[bytes]) -> AsyncIterator[None]:
    """Admission of an encode on ``model`` whose images start with ``headers`` (their first bytes are
    enough): 413 / 429 at once, else the block runs holding its place and pixels."""
    from server.state import AppState

    assert isinstance(state, AppState)
    queue = state.check_ready()
    kind = job_kind("encode", model)
    total = sum(state.admission.pixels_of(headers))
    with state.admission.admit(kind, queue.depths().get(kind, 0), total):
        yield


async def preprocess_arrays(state: object, model: str, image_size: int, arrays: Any, preprocess: str) -> torch.Tensor:
    """Admit an encode of decoded pixels ``arrays`` (B, H, W, 3) uint8 on ``model``: the same pixel limits
    (413) and capacity / decode budget (429) as image files, then preprocess them in the codec pool exactly as
    decoded files are (:func:`models.preprocess.preprocess_image`): (B, 3, S, S) float32 in [-1, 1]."""
    from server.state import AppState

    assert isinstance(state, AppState)
    s = state.settings
    queue = state.check_ready()
    _, h, w, _ = arrays.shape
    if h * w > s.max_image_pixels:
        raise PayloadTooLarge(f"images of {w}x{h} = {h * w} pixels; the limit is {s.max_image_pixels}")
    total = len(arrays) * h * w
    if total > s.max_request_pixels:
        raise PayloadTooLarge(f"the request's images hold {total} pixels; the limit is {s.max_request_pixels} per "
                              "request")
    if preprocess == "center-crop" and image_size * image_size * max(w, h) > s.max_image_pixels * min(w, h):
        raise PayloadTooLarge(f"images of {w}x{h} are too elongated for center-crop at {image_size}: the scaled "
                              f"copy would exceed {s.max_image_pixels} pixels (use preprocess=resize)")
    kind = job_kind("encode", model)
    with state.admission.admit(kind, queue.depths().get(kind, 0), total):
        return await state.codec_pool.run(3 * total, _preprocess_arrays, arrays, image_size, preprocess)  # type: ignore[union-attr]


def _preprocess_arrays(arrays: Any, image_size: int, preprocess: str) -> torch.Tensor:
    return to_model_input([preprocess_image(Image.fromarray(a), image_size, preprocess) for a in arrays])


async def _decode(state: Any, blobs: Sequence[bytes], image_size: int, preprocess: str) -> torch.Tensor:
    s = state.settings
    cost = 3 * sum(state.admission.pixels_of(blobs))
    return await state.codec_pool.run(cost, images_to_tensor, blobs, image_size, preprocess, s.max_image_pixels,
                                      s.max_request_pixels)


async def decode_raw_image(state: object, model: str, image_size: int, request: Any,
                           preprocess: str) -> tuple[torch.Tensor, bytes]:
    """A raw image body (``Content-Type: image/*``): admitted on its first :data:`PEEK_BYTES` (the header),
    so a request that does not fit is refused before the rest of its body is even read. Returns the
    images and the body."""
    stream = request.stream()
    head = b""
    async for chunk in stream:  # usually one chunk: PNG and WebP sizes are in the first 30 bytes
        head += chunk
        if len(head) >= PEEK_BYTES or image_dims(head) is not None:
            break
    async with admit_encode(state, model, [head]):
        parts = [head]
        async for chunk in stream:
            parts.append(chunk)
        body = b"".join(parts)
        return await _decode(state, [body], image_size, preprocess), body


def _tokens(kind: str, raw: Any, spec: ModelSpec, max_rows: int) -> torch.Tensor:
    if kind == "array":  # already parsed (Open Inference Protocol tensors)
        arr: Any = raw
    elif kind == "json":
        arr = tensor_from_json(raw)
    elif kind == "npy":
        arr = tensor_from_npy(raw)
    else:
        arr = tensor_from_safetensors(raw)
    return validate_tokens(arr, spec.token_shape, model=spec.name, max_rows=max_rows,
                           codebook_size=spec.codebook_size)


async def parse_tokens(state: object, spec: ModelSpec, kind: str, raw: Any) -> torch.Tensor:
    """Admit a decode on ``spec`` (429 before parsing when its queue is full), then parse and validate the
    tokens (``kind``: ``json`` (the tensor fields of a JSON body), ``npy`` or ``safetensors`` bytes, or a parsed
    ``array``) in the
    codec pool: the (B, *token shape) tensor the worker decodes."""
    from server.state import AppState

    assert isinstance(state, AppState)
    queue = state.check_ready()
    job = job_kind("decode", spec.name)
    data = raw.get("data") if isinstance(raw, dict) else raw
    cost = 8 * len(data) if isinstance(data, list | bytes) else int(getattr(data, "nbytes", 0))
    with state.admission.admit(job, queue.depths().get(job, 0)):
        return await state.codec_pool.run(cost, _tokens, kind, raw, spec,  # type: ignore[union-attr]
                                          state.settings.max_images_per_request)
