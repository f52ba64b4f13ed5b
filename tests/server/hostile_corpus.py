"""A hostile-input corpus, generated (nothing binary is committed): image bombs, malformed containers, lying
headers, exotic dtypes, non-finite numbers, deep JSON, odd parameters, each with the status the server must
answer and the error ``type`` of docs/API.md. Built for the tiny test models (``softvq-tiny-64`` tokens
(64, 32), ``sit-tiny-64x32``, classes 0..999) and a server with the default limits except
``MAX_BODY_BYTES`` = :data:`BODY_LIMIT`.

    python -m tests.server.hostile_corpus OUT_DIR      # also write every case to files (for other tools)

``test_server_hostile.py`` sends every case to a live server (in-process and Redis queues).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

BODY_LIMIT = 4 * 1024 * 1024
TOKENS = (1, 64, 32)
JSON = {"content-type": "application/json"}
NPY = {"content-type": "application/x-npy"}
ST = {"content-type": "application/vnd.safetensors"}
STATUS_TYPES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                415: "unsupported_media_type", 422: "invalid_value"}


@dataclass
class Case:
    name: str
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 422
    match: str = ""  # a regular expression the error message must match

    @property
    def type(self) -> str:
        return STATUS_TYPES[self.status]


# ---------------------------------------------------------------------------------------------- builders
def png(w: int, h: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A tiny valid-looking PNG whose IHDR claims ``w`` x ``h`` (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A real PNG of ``side`` x ``side`` black pixels: a few hundred KB that would decode to side^2 x 3 bytes."""
    row = b"\0" + b"\0" * (3 * side)
    z = zlib.compressobj(9)
    raw = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def jpeg(w: int = 32, h: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 120, 200)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def npy(descr: object, shape: tuple[int, ...], data: bytes, fortran: bool = False, version: int = 1) -> bytes:
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape}, }}"
    raw = header.encode("latin-1")
    size = 4 if version == 1 else 6
    raw += b" " * ((64 - (6 + 2 + size + len(raw) + 1) % 64) % 64) + b"\n"
    length = struct.pack("<H", len(raw)) if version == 1 else struct.pack("<I", len(raw))
    return b"\x93NUMPY" + bytes([version, 0]) + length + raw + data


def safetensors(dtype: str, shape: list[int], nbytes: int, name: str = "tokens", extra: dict | None = None) -> bytes:
    header = {name: {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}, **(extra or {})}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * nbytes


def tensor(data: object, shape: list[int] | None = None, dtype: str = "float32", **extra: object) -> bytes:
    return json.dumps({"shape": list(TOKENS) if shape is None else shape, "dtype": dtype, "data": data,
                       **extra}).encode()


ZEROS = [0.0] * (TOKENS[0] * TOKENS[1] * TOKENS[2])


# ---------------------------------------------------------------------------------------------- the corpus
def cases() -> Iterator[Case]:
    yield from _json_bodies()
    yield from _images()
    yield from _npy()
    yield from _safetensors()
    yield from _tensors_json()
    yield from _control_fields()
    yield from _contract()


def _json_bodies() -> Iterator[Case]:
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ("/v1/decode", "/v1/generate", "/v1/encode", "/v1/jobs"):
        yield Case(f"deep JSON {path}", "POST", path, deep, JSON, 400, "nested too deeply")
    deep_field = b'{"op": "generate", "class": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    yield Case("deep JSON in a field", "POST", "/v1/jobs", deep_field, JSON, 400, "nested too deeply")
    digits = b"9" * 5000
    yield Case("5000-digit int decode", "POST", "/v1/decode", b'{"shape": [1], "data": [' + digits + b"]}", JSON,
               400, "digits")
    yield Case("5000-digit int generate", "POST", "/v1/generate", b'{"class": ' + digits + b"}", JSON, 400, "digits")
    yield Case("5000-digit int jobs", "POST", "/v1/jobs", b'{"op": "generate", "priority": ' + digits + b"}",
               JSON, 400, "digits")
    yield Case("5000-digit class in the query", "POST", "/v1/generate?class=" + "9" * 5000, status=422,
               match="class")
    yield Case("invalid UTF-8 JSON", "POST", "/v1/generate", b'{"class": "\xff\xfe"}', JSON, 400, "UTF-8|JSON")
    yield Case("truncated JSON", "POST", "/v1/decode", b'{"shape": [1, 64', JSON, 400, "malformed JSON")
    yield Case("empty JSON body", "POST", "/v1/decode", b"", JSON, 400, "empty")
    yield Case("JSON array body decode", "POST", "/v1/decode", b"[1, 2]", JSON, 400, "tensor object")
    yield Case("JSON string body generate", "POST", "/v1/generate", b'"class"', JSON, 400, "object")
    yield Case("lone surrogate as a model name", "POST", "/v1/generate", b'{"class": 1, "model": "\\ud800x"}',
               JSON, 404, "unknown generator")
    yield Case("body over the limit", "POST", "/v1/decode", b"0" * (BODY_LIMIT + 1), NPY, 413, "limit")


def _images() -> Iterator[Case]:
    raw = {"content-type": "image/png"}
    yield Case("PNG header claiming 100k x 100k", "POST", "/v1/encode", png_claiming(100_000, 100_000), raw, 413,
               "pixels")
    yield Case("PNG header claiming 2^31 x 1", "POST", "/v1/encode", png_claiming(2**31 - 1, 1), raw, 413, "")
    yield Case("PNG bomb 8192^2 (compressed, real)", "POST", "/v1/encode", png_bomb(8192), raw, 413, "pixels")
    yield Case("PNG 1 x 20000 (elongated, center-crop)", "POST", "/v1/encode", png(20_000, 1), raw, 413,
               "elongated")
    yield Case("PNG 0-byte", "POST", "/v1/encode", b"", raw, 400, "empty")
    yield Case("PNG truncated", "POST", "/v1/encode", png(64, 64)[:60], raw, 400, "truncated|corrupt")
    yield Case("PNG header only", "POST", "/v1/encode", png_claiming(64, 64)[:33], raw, 400,
               "truncated|corrupt|decodable")
    yield Case("JPEG truncated", "POST", "/v1/encode", jpeg(256, 256)[:300], {"content-type": "image/jpeg"}, 400,
               "truncated|corrupt")
    yield Case("random bytes as PNG", "POST", "/v1/encode", bytes(range(256)) * 8, raw, 400, "not a decodable")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    yield Case("GIF sent as PNG", "POST", "/v1/encode", gif.getvalue(), raw, 415, "GIF")
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    yield Case("TIFF sent as JPEG", "POST", "/v1/encode", tiff.getvalue(), {"content-type": "image/jpeg"}, 415,
               "TIFF")
    yield Case("text/plain body", "POST", "/v1/encode", b"hello", {"content-type": "text/plain"}, 415, "multipart")
    yield Case("no content type", "POST", "/v1/encode", b"hello", {}, 415, "")
    many = json.dumps({"images": [base64.b64encode(png(8, 8)).decode()] * 65}).encode()
    yield Case("65 images (limit 64)", "POST", "/v1/encode", many, JSON, 422, "at most 64")
    four = json.dumps({"images": [base64.b64encode(png_bomb(4096)).decode()] * 5}).encode()
    yield Case("5 x 4096^2 in one request (pixel budget)", "POST", "/v1/encode", four, JSON, 413, "per request")
    yield Case("bad base64", "POST", "/v1/encode", b'{"image": "%%%"}', JSON, 400, "base64")
    yield Case("base64 with non-ASCII", "POST", "/v1/encode", '{"image": "ÿÿÿÿ"}'.encode(), JSON, 400, "base64")
    yield Case("image as a number", "POST", "/v1/encode", b'{"image": 5}', JSON, 422, "image")
    yield Case("images as a string", "POST", "/v1/encode", b'{"images": "abc"}', JSON, 422, "images")
    yield Case("image and images", "POST", "/v1/encode", b'{"image": "", "images": []}', JSON, 422, "exactly one")
    yield Case("unknown JSON field on encode", "POST", "/v1/encode", b'{"image": "", "colour": 1}', JSON, 422,
               "colour|extra")
    yield Case("model as a list on encode", "POST", "/v1/encode", b'{"image": "", "model": ["x"]}', JSON, 422,
               "model")
    boundary = "XyZ"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png(8, 8) + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"colour\"\r\n\r\nred\r\n"
            f"--{boundary}--\r\n").encode()
    yield Case("unknown multipart field", "POST", "/v1/encode", form,
               {"content-type": f"multipart/form-data; boundary={boundary}"}, 422, "colour")
    yield Case("multipart part without its blank line", "POST", "/v1/encode",
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n".encode(),
               {"content-type": f"multipart/form-data; boundary={boundary}"}, 422, "no image")
    yield Case("multipart without a boundary", "POST", "/v1/encode", form, {"content-type": "multipart/form-data"},
               400, "")
    yield Case("multipart image as text", "POST", "/v1/encode",
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc\r\n--{boundary}--\r\n".encode(),
               {"content-type": f"multipart/form-data; boundary={boundary}"}, 400, "file upload")


def _npy() -> Iterator[Case]:
    z = np.zeros(TOKENS, "<f4").tobytes()
    yield Case("npy shape 10^6 x 10^6 x 10^4 (lying header)", "POST", "/v1/decode",
               npy("<f4", (10**6, 10**6, 10**4), b"\0" * 64), NPY, 400, "declares shape")
    yield Case("npy shape 10^12 with 64 bytes", "POST", "/v1/decode", npy("<f4", (10**12,), b"\0" * 64), NPY, 400,
               "declares shape")
    yield Case("npy fewer bytes than its shape", "POST", "/v1/decode", npy("<f4", TOKENS, z[:-4]), NPY, 400,
               "declares shape")
    yield Case("npy more bytes than its shape", "POST", "/v1/decode", npy("<f4", TOKENS, z + b"\0" * 4), NPY, 400,
               "declares shape")
    yield Case("npy object dtype", "POST", "/v1/decode", npy("|O", (2,), b"\0" * 16), NPY, 422, "pickled")
    for descr in ("<c8", "<U3", "|S4", "|V4", "<M8[s]", "<m8[s]", "|b1", "<f16", [("a", "<f4")]):
        itemsize = np.dtype(descr).itemsize if descr != "<f16" else 16
        yield Case(f"npy dtype {descr}", "POST", "/v1/decode", npy(descr, TOKENS, b"\0" * itemsize * 2048), NPY,
                   422, "not accepted")
    yield Case("npy 40 dimensions", "POST", "/v1/decode", npy("<f4", (1,) * 40, b"\0" * 4), NPY, 422,
               "dimensions")
    yield Case("npy 70 dimensions (more than numpy allows)", "POST", "/v1/decode", npy("<f4", (1,) * 70, b"\0" * 4),
               NPY, 422, "dimensions")
    yield Case("npy header that does not parse", "POST", "/v1/decode",
               b"\x93NUMPY\x01\x00\x20\x00{'descr': <f4, 'shape': (1,)}   \n", NPY, 400, "not a valid .npy header")
    yield Case("npy header cut short", "POST", "/v1/decode", b"\x93NUMPY\x01\x00\x10\x00{'descr': <f4\n", NPY, 400,
               "not a valid .npy header")
    yield Case("npy header of a huge length", "POST", "/v1/decode", b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{", NPY, 400,
               "not a valid .npy header")
    yield Case("npy version 9", "POST", "/v1/decode", b"\x93NUMPY\x09\x00" + b"\0" * 64, NPY, 400, "npy")
    yield Case("npy negative dimension", "POST", "/v1/decode", npy("<f4", (-1, 64, 32), b""), NPY, 400, "npy")
    yield Case("npz archive", "POST", "/v1/decode", b"PK\x03\x04" + b"\0" * 64, NPY, 400, "npz")
    yield Case("npy NaN tokens", "POST", "/v1/decode", npy("<f4", TOKENS, np.full(TOKENS, np.nan, "<f4").tobytes()),
               NPY, 422, "NaN")
    yield Case("npy float64 over float32 range", "POST", "/v1/decode",
               npy("<f8", TOKENS, np.full(TOKENS, 1e300, "<f8").tobytes()), NPY, 422, "infinite")
    yield Case("npy int64 tokens for a continuous tokenizer", "POST", "/v1/decode",
               npy("<i8", TOKENS, np.zeros(TOKENS, "<i8").tobytes()), NPY, 422, "int64")
    yield Case("npy wrong token shape", "POST", "/v1/decode", npy("<f4", (1, 64, 16), b"\0" * 4096), NPY, 422,
               r"\(B, 64, 32\)")


def _safetensors() -> Iterator[Case]:
    n = 2048
    yield Case("safetensors header length 2^63", "POST", "/v1/decode", struct.pack("<Q", 2**63) + b"{}", ST, 400,
               "header")
    yield Case("safetensors shorter than 8 bytes", "POST", "/v1/decode", b"\x01\x00", ST, 400, "safetensors")
    yield Case("safetensors header not JSON", "POST", "/v1/decode", struct.pack("<Q", 5) + b"{abc}", ST, 400,
               "JSON")
    yield Case("safetensors header a list", "POST", "/v1/decode", struct.pack("<Q", 2) + b"[]", ST, 400,
               "object")
    deep = b"[" * 5000 + b"]" * 5000
    yield Case("safetensors deep header", "POST", "/v1/decode", struct.pack("<Q", len(deep)) + deep, ST, 400,
               "nested too deeply")
    yield Case("safetensors shape 10^9 x 10^9", "POST", "/v1/decode", safetensors("F32", [10**9, 10**9], 16), ST,
               400, "safetensors")
    yield Case("safetensors offsets past the end", "POST", "/v1/decode",
               safetensors("F32", list(TOKENS), 4 * n)[:-100], ST, 400, "safetensors")
    for dtype, size in (("F8_E4M3", 1), ("F8_E5M2", 1), ("BOOL", 1), ("C64", 8), ("STR", 1), ("F4", 1)):
        yield Case(f"safetensors dtype {dtype}", "POST", "/v1/decode", safetensors(dtype, list(TOKENS), size * n),
                   ST, 422, "not accepted")
    yield Case("safetensors dtype a list", "POST", "/v1/decode",
               struct.pack("<Q", 60) + b'{"tokens": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}'[:60],
               ST, 400, "")
    yield Case("safetensors 9 dimensions", "POST", "/v1/decode", safetensors("F32", [1] * 9, 4), ST, 422,
               "dimensions")
    yield Case("safetensors two tensors, none named tokens", "POST", "/v1/decode",
               safetensors("F32", [1], 4, name="a", extra={"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})
               + b"\0" * 4, ST, 422, "one tensor")
    yield Case("safetensors U64 codes for a continuous tokenizer", "POST", "/v1/decode",
               safetensors("U64", list(TOKENS), 8 * n), ST, 422, "uint64")


def _tensors_json() -> Iterator[Case]:
    yield Case("int8 code 300 (would wrap to 44)", "POST", "/v1/decode", tensor([300] * 2048, dtype="int8"), JSON,
               422, "does not fit dtype int8")
    yield Case("uint8 code -1 (would wrap to 255)", "POST", "/v1/decode", tensor([-1] * 2048, dtype="uint8"),
               JSON, 422, "does not fit dtype uint8")
    yield Case("int64 2^63 (would wrap negative)", "POST", "/v1/decode", tensor([2**63] * 2048, dtype="int64"),
               JSON, 422, "does not fit dtype int64")
    yield Case("int 10^400 in data", "POST", "/v1/decode", tensor([10**400] + ZEROS[1:]), JSON, 422, "out of range")
    yield Case("Infinity tokens", "POST", "/v1/decode",
               b'{"shape": [1, 64, 32], "data": [' + b"Infinity, " * 2047 + b"1]}", JSON, 422, "infinite")
    yield Case("NaN tokens", "POST", "/v1/decode", b'{"shape": [1, 64, 32], "data": [' + b"NaN, " * 2047 + b"1]}",
               JSON, 422, "NaN")
    yield Case("nested data", "POST", "/v1/decode", tensor([[0.0]] * 2048), JSON, 422, "flat")
    yield Case("ragged data", "POST", "/v1/decode", tensor([[0.0], 1.0] * 1024), JSON, 422, "numbers")
    yield Case("strings in data", "POST", "/v1/decode", tensor(["a"] * 2048), JSON, 422, "numbers")
    yield Case("data an object", "POST", "/v1/decode", tensor({"a": 1}), JSON, 422, "flat list")
    yield Case("shape 10^30 x 10^30", "POST", "/v1/decode", tensor([1.0], [10**30, 10**30]), JSON, 422, "needs")
    yield Case("shape of 100 dimensions", "POST", "/v1/decode", tensor([1.0], [1] * 100), JSON, 422, "dimensions")
    yield Case("negative shape", "POST", "/v1/decode", tensor([1.0], [-1]), JSON, 422, "non-negative")
    yield Case("shape of floats", "POST", "/v1/decode", tensor([1.0], [1.5]), JSON, 422, "non-negative integers")
    yield Case("dtype complex64", "POST", "/v1/decode", tensor(ZEROS, dtype="complex64"), JSON, 422, "dtype")
    yield Case("dtype a list", "POST", "/v1/decode", tensor(ZEROS, dtype=["float32"]), JSON, 422, "dtype")
    yield Case("model a list (decode)", "POST", "/v1/decode", tensor(ZEROS, model=["x"]), JSON, 422, "model")
    yield Case("model an object (decode)", "POST", "/v1/decode", tensor(ZEROS, model={"a": 1}), JSON, 422, "model")
    yield Case("format a list (decode)", "POST", "/v1/decode", tensor(ZEROS, format=["png"]), JSON, 422, "format")
    yield Case("format gif (decode)", "POST", "/v1/decode", tensor(ZEROS, format="gif"), JSON, 422, "format")
    yield Case("unknown JSON field (decode)", "POST", "/v1/decode", tensor(ZEROS, colour=1), JSON, 422, "colour")
    yield Case("unknown model (decode)", "POST", "/v1/decode", tensor(ZEROS, model="../../etc/passwd"), JSON, 404,
               "unknown tokenizer")
    yield Case("zero rows", "POST", "/v1/decode", tensor([], [0, 64, 32]), JSON, 422, "no rows")
    yield Case("65 rows (limit 64)", "POST", "/v1/decode", tensor([0.0] * 65 * 2048, [65, 64, 32]), JSON, 422,
               "at most 64")


def _control_fields() -> Iterator[Case]:
    gen = json.dumps({"class": 1, "steps": 2}).encode()
    for value in ("inf", "Infinity", "nan", "-5", "0", "1e300", "1e3", "0x10", "1_000", "٣٠٠", "5 ms",
                  "86400001", "9" * 40):
        yield Case(f"x-deadline-ms {value!r}", "POST", "/v1/generate", gen, {**JSON, "x-deadline-ms": value}, 422,
                   "deadline")
    for value in ("Infinity", "-Infinity", "NaN", "1e300", "0", "-1", "86400001", "true", '"100"', "[]"):
        body = b'{"op": "generate", "class": 1, "steps": 2, "deadline_ms": ' + value.encode() + b"}"
        yield Case(f"jobs deadline_ms {value}", "POST", "/v1/jobs", body, JSON, 422, "deadline_ms")
    for value in ("1e2", "high", "101", "-101", "9" * 30, "٣", "+", "1.5"):
        yield Case(f"x-priority {value!r}", "POST", "/v1/generate", gen, {**JSON, "x-priority": value}, 422,
                   "priority")
    for value in ("1.5", "true", '"5"', "101", "1e2", "null"):
        body = b'{"op": "generate", "class": 1, "steps": 2, "priority": ' + value.encode() + b"}"
        yield Case(f"jobs priority {value}", "POST", "/v1/jobs", body, JSON, 422, "priority")
    for field_, value in (("cfg_scale", "NaN"), ("cfg_scale", "Infinity"), ("cfg_scale", "1e300"),
                          ("cfg_scale", "-1"), ("guidance_interval", "[NaN, 0.5]"),
                          ("guidance_interval", "[0, Infinity]"), ("guidance_interval", "[0.9, 0.1]"),
                          ("guidance_interval", "[0.1]"), ("guidance_low", "NaN"), ("seed", "-1"),
                          ("seed", "1e300"), ("seed", "9007199254740993"), ("steps", "0"), ("steps", "100000"),
                          ("steps", "2.5"), ("num_images", "0"), ("num_images", "65"), ("num_images", "1e30"),
                          ("class", "1000"), ("class", "-1"), ("class", "1.5"), ("class", "true"),
                          ("class", '"1"x'), ("sampler", '"ddim"'), ("sampler", "[]"), ("format", '"gif"'),
                          ("return_latents", '"maybe"'), ("model", "[1]"), ("colour", "1")):
        body = (f'{{"class": 1, "steps": 2, "{field_}": {value}}}' if field_ != "class" else
                f'{{"steps": 2, "class": {value}}}').encode()
        status = 400 if value.endswith("x") else 422
        yield Case(f"generate {field_}={value}", "POST", "/v1/generate", body, JSON, status, "")
    for query in ("cfg_scale=nan", "cfg_scale=inf", "cfg_scale=-inf", "guidance_low=nan", "steps=1e3", "class=0x1",
                  "class=1&class=2", "seed=-1", "num_images=inf", "colour=red"):
        yield Case(f"generate ?{query}", "POST", f"/v1/generate?{query}" + ("" if "class" in query else "&class=1"),
                   status=422)
    yield Case("empty Idempotency-Key", "POST", "/v1/generate", gen, {**JSON, "idempotency-key": ""}, 422,
               "idempotency-key")
    yield Case("256-character Idempotency-Key", "POST", "/v1/generate", gen, {**JSON, "idempotency-key": "k" * 256},
               422, "idempotency-key")
    for value in ("9" * 30, "abc", "1-2-3", "-1", "1e3"):
        yield Case(f"Last-Event-ID {value!r}", "GET", "/v1/jobs/0123456789abcdef/events",
                   headers={"last-event-id": value}, status=422, match="event")
    yield Case("Last-Event-ID of 65 characters", "GET", "/v1/jobs/x/events", headers={"last-event-id": "1" * 65},
               status=422, match="last-event-id")
    yield Case("job id of 129 characters", "GET", "/v1/jobs/" + "a" * 129, status=422, match="job_id")


def _contract() -> Iterator[Case]:
    tokens = tensor(ZEROS)
    yield Case("unknown query parameter (encode)", "POST", "/v1/encode?colour=red", png(8, 8),
               {"content-type": "image/png"}, 422, "colour")
    yield Case("unknown query parameter (decode)", "POST", "/v1/decode?colour=red", tokens, JSON, 422, "colour")
    # a misspelt model must not silently get the default model (issue 21: ?modle= served the default)
    yield Case("misspelt model (encode ?modle=)", "POST", "/v1/encode?modle=x", png(8, 8),
               {"content-type": "image/png"}, 422, "modle")
    yield Case("misspelt model (decode ?modle=)", "POST", "/v1/decode?modle=x", tokens, JSON, 422, "modle")
    yield Case("misspelt model (generate ?modle=)", "POST", "/v1/generate?class=1&steps=2&modle=x", status=422,
               match="modle")
    yield Case("unknown query parameter (models)", "GET", "/v1/models?colour=red", status=422, match="colour")
    yield Case("unknown query parameter (jobs)", "POST", "/v1/jobs?colour=red", b'{"op": "generate", "class": 1}',
               JSON, 422, "colour")
    yield Case("unknown job field", "POST", "/v1/jobs", b'{"op": "generate", "class": 1, "colour": 1}', JSON, 422,
               "colour")
    yield Case("unknown job op", "POST", "/v1/jobs", b'{"op": "train"}', JSON, 422, "op")
    yield Case("job op a list", "POST", "/v1/jobs", b'{"op": ["decode"]}', JSON, 422, "op")
    yield Case("GET /v1/encode", "GET", "/v1/encode", status=405, match="POST")
    yield Case("DELETE /v1/jobs", "DELETE", "/v1/jobs", status=405, match="POST")
    yield Case("PUT /v1/models", "PUT", "/v1/models", status=405, match="GET")
    yield Case("path traversal model", "POST", "/v1/generate", b'{"class": 1, "model": "../../weights"}', JSON, 404,
               "unknown generator")
    yield Case("unknown route", "GET", "/v1/../../etc/passwd", status=404)


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "hostile-corpus")
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for i, c in enumerate(cases()):
        name = f"{i:03d}.bin"
        (out / name).write_bytes(c.body)
        index.append({"file": name, "name": c.name, "method": c.method, "path": c.path, "headers": c.headers,
                      "status": c.status, "type": c.type, "match": c.match})
    (out / "index.json").write_text(json.dumps(index, indent=1, ensure_ascii=True))
    print(f"{len(index)} cases in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
