"""The Open Inference Protocol (KServe v2) on the wire: inference requests in, inference responses out.

Pure and synchronous (no FastAPI, no models): ``server.routes.v2`` calls it, in the codec pool for large bodies.

A request body is a JSON object, optionally followed by binary tensor data (the ``binary_tensor_data``
extension): the header ``Inference-Header-Content-Length: N`` says the first N bytes are the JSON; each input
with ``parameters.binary_data_size`` takes that many of the following bytes, in the order of ``inputs``.
Numeric tensors travel as little-endian raw bytes; ``BYTES`` elements as a 4-byte little-endian length then the
bytes. In JSON, ``data`` is row-major, flat or nested; ``BYTES`` elements are strings (base64 text for binary
files, as tokserve's ``IMAGE_BYTES``). A response puts an output in the binary part when asked
(``outputs[i].parameters.binary_data`` or the request's ``parameters.binary_data_output``) and then reports its
``parameters.binary_data_size`` instead of ``data``.

Every problem raises a :mod:`server.errors` error: 400 for a body that does not parse or whose sizes do not
add up, 422 for valid syntax with invalid values (datatype, shape, names, parameters).
"""

from __future__ import annotations

import base64
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from server.codecs import MAX_NDIM, check_int_range, parse_json
from server.errors import BadRequest, InvalidValue

HEADER_LENGTH = "inference-header-content-length"
_HEADER_RE = re.compile(r"^[0-9]{1,12}$")
# v2 datatype -> numpy dtype (BYTES: a list of bytes / str; BF16: read through torch, held as float32)
NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BF16": np.float32,
}
DATATYPES = (*NUMPY_DTYPES, "BYTES")
FLOAT_TYPES = ("FP16", "FP32", "FP64", "BF16")
INT_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
REQUEST_FIELDS = ("id", "parameters", "inputs", "outputs")
INPUT_FIELDS = ("name", "shape", "datatype", "parameters", "data")
OUTPUT_FIELDS = ("name", "parameters")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model's signature; ``-1`` marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class InferInput:
    """A parsed input tensor. ``data``: a numpy array of ``shape`` (BF16 as float32), or for ``BYTES`` a flat
    list of its elements: ``bytes`` from the binary part, ``str`` from JSON."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes | str]
    binary: bool


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: not said (the request's binary_data_output decides)


@dataclass
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None  # None: the model's default outputs
    binary_output: bool = False  # parameters.binary_data_output

    def input(self, name: str) -> InferInput | None:
        return next((t for t in self.inputs if t.name == name), None)


@dataclass
class InferOutput:
    """An output to send: ``data`` a numpy array of ``shape``, or for ``BYTES`` a list of bytes."""

    name: str
    datatype: str
    data: np.ndarray | list[bytes]
    binary: bool
    shape: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.shape:
            self.shape = (len(self.data),) if isinstance(self.data, list) else tuple(self.data.shape)


# ---------------------------------------------------------------------------------------------- requests


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(the JSON part, the binary part) of a request body, by its ``Inference-Header-Content-Length``."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not _HEADER_RE.fullmatch(text):
        raise BadRequest(f"Inference-Header-Content-Length must be a number of bytes, got {_short(text)}")
    n = int(text)
    if n > len(body):
        raise BadRequest(f"Inference-Header-Content-Length is {n} but the body has {len(body)} bytes")
    return body[:n], body[n:]


def parse_request(body: bytes, header_length: str | None, max_elements: int) -> InferRequest:
    """An inference request body -> :class:`InferRequest`. ``max_elements`` bounds each input's element count
    (checked on the declared shape, before any data is read)."""
    head, binary = split_body(body, header_length)
    obj = parse_json(head, "inference request")
    if not isinstance(obj, dict):
        raise BadRequest('the inference request must be a JSON object {"inputs": [...]}')
    unknown = sorted(set(obj) - set(REQUEST_FIELDS))
    if unknown:
        raise InvalidValue(f"unknown fields {_short(unknown)} in the inference request: it has {list(REQUEST_FIELDS)}")
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidValue("id must be a string")
    params = parameters(obj.get("parameters"), "parameters")
    binary_output = params.pop("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidValue("parameters.binary_data_output must be true or false")
    raw_inputs = obj.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidValue("inputs must be a non-empty list of tensors")
    if len(raw_inputs) > 16:
        raise InvalidValue(f"{len(raw_inputs)} inputs; a model here takes one or two")
    offset = 0
    inputs: list[InferInput] = []
    for i, raw in enumerate(raw_inputs):
        t, used = _parse_input(raw, i, binary[offset:], max_elements)
        offset += used
        if any(t.name == other.name for other in inputs):
            raise InvalidValue(f"input {t.name!r} is given twice")
        inputs.append(t)
    if offset != len(binary):
        raise BadRequest(f"the inputs' binary_data_size add up to {offset} bytes but {len(binary)} follow the "
                         "JSON header")
    return InferRequest(id=rid, parameters=params, inputs=inputs, outputs=_parse_outputs(obj.get("outputs")),
                        binary_output=binary_output)


def parameters(value: object, where: str) -> dict[str, Any]:
    """A ``parameters`` object: names -> string, number or boolean (the v2 ``$parameter``)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidValue(f"{where} must be an object of name: value")
    for k, v in value.items():
        if not isinstance(v, str | int | float | bool):
            raise InvalidValue(f"{where}.{_short(k, 40)} must be a string, number or boolean, got "
                               f"{type(v).__name__}")
    return dict(value)


def _parse_input(raw: object, i: int, binary: bytes, max_elements: int) -> tuple[InferInput, int]:
    """One input tensor (and how many bytes of ``binary`` it took)."""
    raw, name = _named_entry(raw, f"inputs[{i}]", INPUT_FIELDS, "a tensor object")
    where = f"input {_short(name, 40)}"
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        raise InvalidValue(f"{where}: datatype {_short(datatype)} is not a v2 datatype; use one of {list(DATATYPES)}")
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise InvalidValue(f"{where}: shape must be a list of non-negative integers, got {_short(shape)}")
    if len(shape) > MAX_NDIM:
        raise InvalidValue(f"{where}: shape has {len(shape)} dimensions; at most {MAX_NDIM}")
    n = math.prod(shape)
    if n > max_elements:
        raise InvalidValue(f"{where}: shape {shape} holds {n} elements; at most {max_elements} per input")
    params = parameters(raw.get("parameters"), f"{where}.parameters")
    shm = sorted(k for k in params if k.startswith("shared_memory"))
    if shm:
        raise InvalidValue(f"{where}: shared memory ({shm[0]}) is not supported; send the data in the body")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidValue(f"{where}: binary_data_size must be a non-negative integer")
        if "data" in raw:
            raise InvalidValue(f"{where}: give data or parameters.binary_data_size, not both")
        if size > len(binary):
            raise BadRequest(f"{where}: binary_data_size is {size} but only {len(binary)} bytes of binary data "
                             "remain")
        data = _from_binary(binary[:size], datatype, shape, n, where)
        return InferInput(name, datatype, tuple(shape), data, binary=True), size
    if "data" not in raw:
        raise InvalidValue(f"{where} has no data (nor parameters.binary_data_size)")
    if datatype == "BF16":
        raise InvalidValue(f"{where}: BF16 tensors travel as binary data only")
    return InferInput(name, datatype, tuple(shape), _from_json(raw["data"], datatype, shape, n, where),
                      binary=False), 0


def _named_entry(raw: object, where: str, fields: tuple[str, ...], what: str) -> tuple[dict[str, Any], str]:
    """An element of ``inputs`` / ``outputs``: an object of ``fields`` only, with a non-empty string ``name``.
    Returns it and its name."""
    if not isinstance(raw, dict):
        shown = ", ".join(f'"{f}"' for f in fields)
        raise InvalidValue(f"{where} must be {what} {{{shown}}}")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise InvalidValue(f"unknown fields {_short(unknown)} in {where}: it takes {list(fields)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidValue(f"{where}.name must be a non-empty string")
    return raw, name


def _from_binary(raw: bytes, datatype: str, shape: list[int], n: int, where: str) -> np.ndarray | list[bytes | str]:
    if datatype == "BYTES":
        out: list[bytes | str] = []
        pos = 0
        while pos < len(raw):
            if len(out) == n or pos + 4 > len(raw):
                break
            (length,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + length > len(raw):
                raise BadRequest(f"{where}: a BYTES element of {length} bytes runs past the input's binary data")
            out.append(raw[pos:pos + length])
            pos += length
        if len(out) != n or pos != len(raw):
            raise BadRequest(f"{where}: the binary data holds {len(out)} BYTES elements ({pos} of {len(raw)} "
                             f"bytes read) but shape {shape} needs {n}")
        return out
    if datatype == "BF16":
        if len(raw) != 2 * n:
            raise BadRequest(f"{where}: shape {shape} of BF16 needs {2 * n} bytes, got {len(raw)}")
        t = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16) if n else torch.empty(0, dtype=torch.bfloat16)
        return t.float().numpy().reshape(shape)
    dtype = np.dtype(NUMPY_DTYPES[datatype]).newbyteorder("<")
    if len(raw) != n * dtype.itemsize:
        raise BadRequest(f"{where}: shape {shape} of {datatype} needs {n * dtype.itemsize} bytes, got {len(raw)}")
    arr = np.frombuffer(raw, dtype=dtype, count=n) if n else np.empty(0, dtype)
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _from_json(data: object, datatype: str, shape: list[int], n: int, where: str) -> np.ndarray | list[bytes | str]:
    if not isinstance(data, list):
        raise InvalidValue(f"{where}: data must be a list (row-major, flat or nested)")
    if datatype == "BYTES":
        flat: list[bytes | str] = []
        _flatten_strings(data, flat, len(shape), n, where)
        if len(flat) != n:
            raise InvalidValue(f"{where}: data has {len(flat)} elements but shape {shape} needs {n}")
        return flat
    try:
        arr = np.asarray(data, dtype=np.bool_ if datatype == "BOOL" else np.float64)
    except (TypeError, ValueError):
        raise InvalidValue(f"{where}: data must hold only numbers, as a flat or evenly nested list") from None
    except OverflowError:
        raise InvalidValue(f"{where}: data holds a number out of range") from None
    if arr.size != n:
        raise InvalidValue(f"{where}: data has {arr.size} elements but shape {shape} needs {n}")
    flat_arr = arr.reshape(-1)
    if datatype in INT_TYPES:
        if not np.all(np.isfinite(flat_arr)) or np.any(flat_arr != np.round(flat_arr)):
            raise InvalidValue(f"{where}: datatype {datatype} needs integer data")
        dtype = np.dtype(NUMPY_DTYPES[datatype])
        check_int_range(flat_arr, dtype)
        return flat_arr.astype(dtype).reshape(shape)
    with np.errstate(over="ignore"):
        return flat_arr.astype(NUMPY_DTYPES[datatype]).reshape(shape)


def _flatten_strings(data: list[Any], out: list[bytes | str], depth: int, n: int, where: str) -> None:
    for item in data:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list) and depth > 1:
            _flatten_strings(item, out, depth - 1, n, where)
        else:
            raise InvalidValue(f"{where}: BYTES data must be strings (base64 text for binary files), as a flat or "
                               "evenly nested list")
        if len(out) > n:
            raise InvalidValue(f"{where}: data has more than the {n} elements its shape needs")


def _parse_outputs(value: object) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > 16:
        raise InvalidValue("outputs must be a list of {\"name\", \"parameters\"} objects")
    out: list[RequestedOutput] = []
    for i, entry in enumerate(value):
        raw, name = _named_entry(entry, f"outputs[{i}]", OUTPUT_FIELDS, "an object")
        params = parameters(raw.get("parameters"), f"outputs[{i}].parameters")
        binary = params.pop("binary_data", None)
        if binary is not None and not isinstance(binary, bool):
            raise InvalidValue(f"output {_short(name, 40)}: binary_data must be true or false")
        if params:
            raise InvalidValue(f"output {_short(name, 40)}: parameters {_short(sorted(params))} are not supported "
                               "(only binary_data)")
        if any(o.name == name for o in out):
            raise InvalidValue(f"output {_short(name, 40)} is requested twice")
        out.append(RequestedOutput(name, binary))
    return out


# ---------------------------------------------------------------------------------------------- responses


def render_response(model: str, request_id: str | None, outputs: list[InferOutput],
                    params: dict[str, Any] | None = None) -> tuple[bytes, int | None]:
    """(the body, the JSON header's length when binary outputs follow it, else None)."""
    import json

    head: dict[str, Any] = {"model_name": model}
    if request_id is not None:
        head["id"] = request_id
    if params:
        head["parameters"] = params
    tensors, blobs = [], []
    for o in outputs:
        t: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
        if o.binary:
            blob = _to_binary(o)
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif isinstance(o.data, list):
            t["data"] = [base64.b64encode(b).decode("ascii") for b in o.data]
        else:
            t["data"] = o.data.reshape(-1).tolist()
        tensors.append(t)
    head["outputs"] = tensors
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)


def _to_binary(o: InferOutput) -> bytes:
    if isinstance(o.data, list):
        return b"".join(struct.pack("<I", len(b)) + b for b in o.data)
    return np.ascontiguousarray(o.data, dtype=np.dtype(NUMPY_DTYPES[o.datatype]).newbyteorder("<")).tobytes()


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."
