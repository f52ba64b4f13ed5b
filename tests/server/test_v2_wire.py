"""The Open Inference Protocol wire format (``server.oip``) against the real ``tritonclient``'s own encoder and
decoder: what tritonclient sends parses to the tensors it was given, and what the server renders is read back
by tritonclient's ``InferResult``; every malformed body is a 400 / 422, never another exception."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.http._utils import _get_inference_request

from server import oip
from server.errors import BadRequest, InvalidValue

LIMIT = 1 << 24


def _send(inputs: list, outputs: list | None = None, parameters: dict | None = None) -> oip.InferRequest:
    """The body tritonclient would send, parsed by the server."""
    body, json_size = _get_inference_request(inputs=inputs, request_id="r1", outputs=outputs, sequence_id=0,
                                             sequence_start=False, sequence_end=False, priority=0, timeout=None,
                                             custom_parameters=parameters)
    return oip.parse_request(body, None if json_size is None else str(json_size), LIMIT)


def _input(name: str, arr: np.ndarray, datatype: str, binary: bool) -> httpclient.InferInput:
    t = httpclient.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr, binary_data=binary)
    return t


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize(("datatype", "dtype"), [("UINT8", np.uint8), ("INT64", np.int64), ("FP32", np.float32),
                                                 ("FP16", np.float16), ("INT8", np.int8), ("FP64", np.float64)])
def test_numeric_tensors_from_tritonclient(datatype: str, dtype: type, binary: bool) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(2, 3, 4)) * 50).astype(dtype)
    req = _send([_input("X", arr, datatype, binary), _input("Y", arr[:1], datatype, binary)],
                parameters={"seed": 3, "cfg_scale": 1.5})
    x, y = req.inputs
    assert (x.name, x.datatype, x.shape, x.binary) == ("X", datatype, (2, 3, 4), binary)
    np.testing.assert_array_equal(x.data, arr)
    np.testing.assert_array_equal(y.data, arr[:1])
    assert req.id == "r1" and req.parameters == {"seed": 3, "cfg_scale": 1.5}
    assert req.outputs is None and req.binary_output  # no outputs asked: tritonclient asks for binary


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_tensors(binary: bool) -> None:
    items = [b"\x89PNG\r\n\x1a\n\x00\xff", b"", b"abc"] if binary else [b"aGVsbG8=", b"", b"YQ=="]
    req = _send([_input("IMAGE_BYTES", np.array(items, dtype=np.object_), "BYTES", binary)],
                outputs=[httpclient.InferRequestedOutput("IMAGE", binary_data=False)])
    t = req.inputs[0]
    assert t.data == (items if binary else [i.decode() for i in items])
    assert req.outputs == [oip.RequestedOutput("IMAGE", False)]


def test_bf16_binary_becomes_float32() -> None:
    values = torch.tensor([[1.5, -2.0, 3.25]], dtype=torch.bfloat16)
    raw = values.view(torch.int16).numpy().tobytes()
    head = json.dumps({"inputs": [{"name": "T", "datatype": "BF16", "shape": [1, 3],
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    t = oip.parse_request(head + raw, str(len(head)), LIMIT).inputs[0]
    assert t.data.dtype == np.float32
    np.testing.assert_array_equal(t.data, values.float().numpy())


def test_nested_json_data_is_row_major() -> None:
    body = json.dumps({"inputs": [{"name": "X", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]})
    t = oip.parse_request(body.encode(), None, LIMIT).inputs[0]
    np.testing.assert_array_equal(t.data, np.array([[1, 2], [3, 4]], np.int32))


@pytest.mark.parametrize("binary", [True, False])
def test_responses_read_back_by_tritonclient(binary: bool) -> None:
    tokens = np.random.default_rng(1).normal(size=(2, 4, 3)).astype(np.float32)
    codes = np.arange(6, dtype=np.int64).reshape(2, 3)
    files = [b"\x89PNG-one", b"\x00\x01two"]
    outputs = [oip.InferOutput("TOKENS", "FP32", tokens, binary), oip.InferOutput("CODES", "INT64", codes, not binary),
               oip.InferOutput("IMAGE_BYTES", "BYTES", files, binary)]
    body, json_size = oip.render_response("m.encode", "r9", outputs, {"seed": 5})
    assert json_size is not None  # one of the outputs is binary either way
    result = httpclient.InferResult.from_response_body(body, header_length=json_size)
    np.testing.assert_array_equal(result.as_numpy("TOKENS").reshape(tokens.shape), tokens)
    np.testing.assert_array_equal(result.as_numpy("CODES").reshape(codes.shape), codes)
    got = list(result.as_numpy("IMAGE_BYTES"))  # JSON BYTES: base64 text
    assert got == (files if binary else [base64.b64encode(f).decode() for f in files])
    assert result.get_response()["id"] == "r9" and result.get_response()["parameters"] == {"seed": 5}
    plain, size = oip.render_response("m", None, [oip.InferOutput("CODES", "INT64", codes, False)])
    assert size is None and json.loads(plain)["outputs"][0]["data"] == list(range(6))


HEAD = {"name": "X", "datatype": "UINT8", "shape": [4]}


@pytest.mark.parametrize(("body", "header", "error"), [
    (b"", None, BadRequest),
    (b"\xff\xfe", None, BadRequest),
    (b'"inputs"', None, BadRequest),
    (json.dumps({"inputs": [HEAD | {"data": [1, 2, 3, 4]}], "extra": 1}).encode(), None, InvalidValue),
    (json.dumps({"inputs": [HEAD | {"data": [1, 2, 3]}]}).encode(), None, InvalidValue),
    (json.dumps({"inputs": [HEAD | {"data": [1, 2, 3, 256]}]}).encode(), None, InvalidValue),
    (json.dumps({"inputs": [HEAD | {"data": [1, 2, 3, 4.5]}]}).encode(), None, InvalidValue),
    (json.dumps({"inputs": [HEAD | {"data": [[1, 2], [3]]}]}).encode(), None, InvalidValue),
    (json.dumps({"inputs": [HEAD | {"data": ["a", 2, 3, 4]}]}).encode(), None, InvalidValue),
    (json.dumps({"inputs": [HEAD | {"shape": [-1], "data": []}]}).encode(), None, InvalidValue),
    (json.dumps({"inputs": [HEAD | {"shape": [1 << 40], "data": []}]}).encode(), None, InvalidValue),
    (json.dumps({"inputs": [HEAD | {"shape": [1] * 9, "data": [1]}]}).encode(), None, InvalidValue),
    (json.dumps({"inputs": [HEAD | {"data": [1, 2, 3, 4]}, HEAD | {"data": [1, 2, 3, 4]}]}).encode(), None,
     InvalidValue),
    (json.dumps({"inputs": [HEAD | {"parameters": {"shared_memory_region": "r"}}]}).encode(), None, InvalidValue),
    (json.dumps({"inputs": [HEAD | {"parameters": {"binary_data_size": 4}}]}).encode() + b"abcd", "x", BadRequest),
    (json.dumps({"inputs": [HEAD | {"parameters": {"binary_data_size": 4}, "data": [1, 2, 3, 4]}]}).encode(), None,
     InvalidValue),
    (json.dumps({"inputs": [HEAD | {"parameters": {"binary_data_size": 5}}]}).encode() + b"abcd", "57",
     BadRequest),
    (json.dumps({"inputs": [{"name": "B", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 8}}]}
                ).encode() + b"\x09\x00\x00\x00abcd", "79", BadRequest),
    (json.dumps({"inputs": [HEAD | {"data": [1, 2, 3, 4]}], "outputs": [{"name": "Y", "parameters": {
        "classification": 3}}]}).encode(), None, InvalidValue),
    (json.dumps({"inputs": [HEAD | {"data": [1, 2, 3, 4]}], "parameters": {"seed": [1]}}).encode(), None,
     InvalidValue),
])
def test_malformed_requests_are_refused_with_their_reason(body: bytes, header: str | None, error: type) -> None:
    if header not in (None, "x"):  # the JSON part's real length
        header = str(body.index(b"}]}") + 3)
    with pytest.raises(error):
        oip.parse_request(body, header, LIMIT)
