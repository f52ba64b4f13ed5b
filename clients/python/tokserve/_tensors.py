"""Token tensors on the wire: ``.npy`` (the default), safetensors, and the JSON tensor form."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

NPY = "application/x-npy"
SAFETENSORS = "application/vnd.safetensors"
JSON = "application/json"

_ST_DTYPES = {
    "F16": np.float16,
    "BF16": None,  # no numpy dtype; refused below
    "F32": np.float32,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items() if v is not None}


def to_npy(array: np.ndarray) -> bytes:
    """Serialise an array as a ``.npy`` file (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes) -> np.ndarray:
    """Read a ``.npy`` file (pickled object arrays are refused)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def to_safetensors(array: np.ndarray, name: str = "tokens") -> bytes:
    """Serialise one array as a safetensors file holding one tensor called ``name``."""
    array = np.ascontiguousarray(array)
    dtype = _NP_TO_ST.get(array.dtype)
    if dtype is None:
        raise TypeError(f"dtype {array.dtype} has no safetensors equivalent")
    payload = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    header = {name: {"dtype": dtype, "shape": list(array.shape), "data_offsets": [0, len(payload)]}}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def from_safetensors(data: bytes, name: str = "tokens") -> np.ndarray:
    """Read the tensor ``name`` (or the only tensor) of a safetensors file."""
    if len(data) < 8:
        raise ValueError("safetensors body too short")
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    header.pop("__metadata__", None)
    if name not in header:
        if len(header) != 1:
            raise ValueError(f"safetensors body has no tensor {name!r}: {sorted(header)}")
        name = next(iter(header))
    entry = header[name]
    dtype = _ST_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise TypeError(f"safetensors dtype {entry['dtype']} is not supported by numpy")
    start, end = entry["data_offsets"]
    body = data[8 + n + start : 8 + n + end]
    return np.frombuffer(body, dtype=np.dtype(dtype).newbyteorder("<")).reshape(entry["shape"]).copy()


def to_json_tensor(array: np.ndarray) -> dict[str, Any]:
    """The JSON tensor form ``{"shape", "dtype", "data"}`` (row-major flat data)."""
    dtype = "int64" if np.issubdtype(array.dtype, np.integer) else "float32"
    return {"shape": list(array.shape), "dtype": dtype, "data": array.astype(dtype).ravel().tolist()}


def from_json_tensor(obj: Mapping[str, Any]) -> np.ndarray:
    """An array from the JSON tensor form; float tensors come back as float32, integer codes as int64."""
    dtype = str(obj.get("dtype", "float32"))
    return np.asarray(obj["data"], dtype=dtype).reshape([int(s) for s in obj["shape"]])


def parse_tensor_response(content_type: str, body: bytes) -> tuple[np.ndarray, str | None]:
    """``(array, model)`` from an encode response in any of the three forms (model only from JSON)."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == NPY:
        return from_npy(body), None
    if ctype == SAFETENSORS:
        return from_safetensors(body), None
    obj = json.loads(body.decode("utf-8"))
    return from_json_tensor(obj), obj.get("model")
