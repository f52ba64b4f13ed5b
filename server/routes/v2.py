"""The Open Inference Protocol (KServe v2) beside the native routes: ``GET /v2``, ``/v2/health/live``,
``/v2/health/ready``, ``GET /v2/models/{name}``, ``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``.

Model names: a tokenizer ``M`` serves two v2 models, ``M.encode`` and ``M.decode``; a generator ``G`` is ``G``.
Tensors (B = batch; S = the model's image size; the token shape is the tokenizer's, ``GET /v1/models``):

    M.encode   in:  IMAGE UINT8 (B, H, W, 3)  or  IMAGE_BYTES BYTES (B,) (PNG / JPEG / WebP files)
               out: TOKENS FP32 (B, L, D) (continuous)  or  CODES INT64 (B, *code shape) (discrete)
    M.decode   in:  TOKENS / CODES as above     out: IMAGE UINT8 (B, S, S, 3), IMAGE_BYTES BYTES (B,) on request
    G          in:  CLASS INT64 (B,)            out: IMAGE, IMAGE_BYTES on request, TOKENS / CODES on request

Request parameters: encode ``preprocess``; decode ``format``; generate ``seed``, ``cfg_scale``, ``steps``,
``sampler``, ``guidance_low``, ``guidance_high``, ``format``; any: ``timeout`` (microseconds, a deadline) and
``binary_data_output``. Everything past the wire format is the native routes' own path: the same validation
(:mod:`server.validation`, :mod:`server.admission`), the same ``run_job`` (so v2 and native requests share
batches), limits, API keys, metrics (op label encode / decode / generate) and error table.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response

from models.preprocess import to_uint8
from server import oip
from server.codecs import decode_base64
from server.deps import OptionsDep, RequestOptions, StateDep
from server.engine.specs import ModelSet, ModelSpec
from server.errors import InvalidValue, NotFound, NotReady, UnsupportedMediaType
from server.render import image_files
from server.routes.common import BINARY, request_body, run_job, schema_ref
from server.schemas import (
    V2_ERROR_RESPONSES,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
)
from server.settings import Settings
from server.state import AppState
from server.validation import (
    MAX_DEADLINE_MS,
    describe_classes,
    valid_decode,
    valid_encode,
    valid_encode_pixels,
    valid_generate,
)

router = APIRouter()  # the model routes (API key when configured)
public = APIRouter()  # server metadata and health (open, like /healthz and /readyz)

TOKENIZER_OPS = ("encode", "decode")
EXTENSIONS = ["binary_tensor_data"]
IMAGE_FORMATS = ("png", "jpeg", "webp")
OP_PARAMETERS = {
    "encode": ("preprocess",),
    "decode": ("format",),
    "generate": ("seed", "cfg_scale", "steps", "sampler", "guidance_low", "guidance_high", "format"),
}
COMMON_PARAMETERS = ("timeout",)


def _responses(*codes: int) -> dict[int | str, dict[str, object]]:
    return {c: V2_ERROR_RESPONSES[c] for c in codes}


# ---------------------------------------------------------------------------------------------- models


def v2_names(models: ModelSet) -> list[str]:
    """Every v2 model name served: ``M.encode`` and ``M.decode`` per tokenizer, ``G`` per generator."""
    out = []
    for s in models.specs.values():
        out += [f"{s.name}.{op}" for op in TOKENIZER_OPS] if s.kind == "tokenizer" else [s.name]
    return sorted(out)


def resolve(models: ModelSet, name: str) -> tuple[ModelSpec, str]:
    """A v2 model name -> (the served model, its operation); 404 for anything else."""
    base, _, op = name.rpartition(".")
    spec = models.specs.get(base)
    if spec is not None and spec.kind == "tokenizer" and op in TOKENIZER_OPS:
        return spec, op
    spec = models.specs.get(name)
    if spec is not None and spec.kind == "generator":
        return spec, "generate"
    hint = f" (a tokenizer is {name}.encode / {name}.decode)" if spec is not None else ""
    raise NotFound(f"unknown model {name[:80]!r}{hint}; served: {v2_names(models)}")


def signature(spec: ModelSpec, op: str) -> tuple[list[oip.TensorSpec], list[oip.TensorSpec]]:
    """(inputs, outputs) of ``spec`` doing ``op``; ``-1`` marks a variable dimension."""
    S = spec.image_size
    image = oip.TensorSpec("IMAGE", "UINT8", (-1, S, S, 3))
    files = oip.TensorSpec("IMAGE_BYTES", "BYTES", (-1,))
    tokens = (oip.TensorSpec("CODES", "INT64", (-1, *spec.token_shape)) if spec.discrete
              else oip.TensorSpec("TOKENS", "FP32", (-1, *spec.token_shape)))
    if op == "encode":
        return [oip.TensorSpec("IMAGE", "UINT8", (-1, -1, -1, 3)), files], [tokens]
    if op == "decode":
        return [tokens], [image, files]
    return [oip.TensorSpec("CLASS", "INT64", (-1,))], [image, files, tokens]


def default_outputs(spec: ModelSpec, op: str) -> list[str]:
    """What an infer request without ``outputs`` gets: the tokens of an encode, else ``IMAGE``."""
    return [signature(spec, op)[1][0].name]


# ---------------------------------------------------------------------------------------------- metadata, health


@public.get("/v2", response_model=V2ServerMetadata, summary="v2: server metadata")
async def server_metadata(request: Request) -> V2ServerMetadata:
    return V2ServerMetadata(name="tokserve", version=request.app.version, extensions=EXTENSIONS)


@public.get("/v2/health/live", response_model=V2Live, summary="v2: liveness")
async def live() -> V2Live:
    return V2Live(live=True)


async def _check_ready(state: AppState) -> None:
    queue = state.check_ready()
    if not await queue.ready():
        raise NotReady("the queue backend has no live worker", retry_after=state.settings.retry_after_s)


@public.get("/v2/health/ready", response_model=V2Ready, responses=_responses(503), summary="v2: readiness")
async def ready(state: StateDep) -> V2Ready:
    """200 once every model is loaded and warmed up (as ``/readyz``), else 503."""
    await _check_ready(state)
    return V2Ready(ready=True)


@router.get("/v2/models/{name}", response_model=V2ModelMetadata, responses=_responses(401, 404),
            summary="v2: model metadata")
async def model_metadata(name: str, state: StateDep) -> V2ModelMetadata:
    """Inputs and outputs with their datatype and shape (-1: variable)."""
    spec, op = resolve(state.models, name)
    inputs, outputs = signature(spec, op)
    return V2ModelMetadata.model_validate({
        "name": name, "platform": f"tokserve/{spec.family}",
        "inputs": [t.metadata() for t in inputs], "outputs": [t.metadata() for t in outputs]})


@router.get("/v2/models/{name}/ready", response_model=V2ModelReady, responses=_responses(401, 404, 503),
            summary="v2: model readiness")
async def model_ready(name: str, state: StateDep) -> V2ModelReady:
    resolve(state.models, name)
    await _check_ready(state)
    return V2ModelReady(name=name, ready=True)


# ---------------------------------------------------------------------------------------------- infer

INFER_OPENAPI = request_body({"application/json": schema_ref("V2InferRequest"), "application/octet-stream": BINARY})
INFER_RESPONSES = {**V2_ERROR_RESPONSES, 200: {
    "model": V2InferResponse, "description": "JSON; with binary outputs, the JSON (Inference-Header-Content-Length "
    "bytes) then the outputs' bytes", "content": {"application/octet-stream": BINARY}}}


@router.post("/v2/models/{name}/infer", openapi_extra=INFER_OPENAPI, responses=INFER_RESPONSES,
             response_model=V2InferResponse, summary="v2: inference")
async def infer(name: str, request: Request, state: StateDep, opts: OptionsDep) -> Response:
    """An inference request (JSON, or JSON then binary tensor data: ``Inference-Header-Content-Length``).
    Tensors and parameters per model: docs/API.md, "Open Inference Protocol"."""
    spec, op = resolve(state.models, name)
    request.scope.setdefault("state", {}).update(op=op, model=spec.name)
    state.check_ready()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:40]!r} is not accepted: send the body uncompressed")
    body = await request.body()
    header = request.headers.get(oip.HEADER_LENGTH)
    limit = state.settings.max_body_bytes
    if len(body) <= 64 * 1024:
        req = oip.parse_request(body, header, limit)
    else:
        req = await state.codec(oip.parse_request, body, header, limit, cost=len(body))
    inputs, outputs = signature(spec, op)
    _check_names(name, req, inputs, outputs)
    _check_parameters(name, op, req.parameters)
    _apply_timeout(opts, req.parameters)
    wanted = _wanted(spec, op, req)
    if op == "encode":
        values, params = await _encode(request, state, opts, spec, req)
    elif op == "decode":
        values, params = await _decode(request, state, opts, spec, req, wanted)
    else:
        values, params = await _generate(request, state, opts, spec, req, wanted)
    types = {t.name: t.datatype for t in outputs}
    out = [oip.InferOutput(n, types[n], values[n], binary) for n, binary in wanted.items()]
    cost = sum(v.nbytes if isinstance(v, np.ndarray) else sum(map(len, v)) for v in values.values())
    content, json_size = await state.codec(oip.render_response, name, req.id, out, params, cost=cost)
    if json_size is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(json_size)})


def _check_names(model: str, req: oip.InferRequest, inputs: list[oip.TensorSpec],
                 outputs: list[oip.TensorSpec]) -> None:
    known = {t.name for t in inputs}
    for t in req.inputs:
        if t.name not in known:
            raise InvalidValue(f"unknown input {t.name[:40]!r} for model {model}: its inputs are "
                               f"{_describe(inputs)}")
    known = {t.name for t in outputs}
    for o in req.outputs or ():
        if o.name not in known:
            raise InvalidValue(f"unknown output {o.name[:40]!r} for model {model}: its outputs are "
                               f"{_describe(outputs)}")


def _describe(tensors: list[oip.TensorSpec]) -> str:
    return ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in tensors)


def _check_parameters(model: str, op: str, params: dict[str, Any]) -> None:
    allowed = (*OP_PARAMETERS[op], *COMMON_PARAMETERS)
    unknown = sorted(k for k in params if k not in allowed)
    if unknown:
        extra = " (priority: use the x-priority header, -100..100)" if "priority" in unknown else ""
        raise InvalidValue(f"parameters {unknown[:5]} are not taken by model {model}: it takes {list(allowed)} and "
                           f"binary_data_output{extra}")


def _apply_timeout(opts: RequestOptions, params: dict[str, Any]) -> None:
    """``parameters.timeout`` (microseconds, as tritonclient sends it) shortens the request's deadline."""
    us = params.get("timeout")
    if us is None:
        return
    if isinstance(us, bool) or not isinstance(us, int) or not 0 < us <= MAX_DEADLINE_MS * 1000:
        raise InvalidValue(f"parameters.timeout must be an integer number of microseconds in (0, "
                           f"{MAX_DEADLINE_MS * 1000}], got {str(us)[:40]}")
    opts.deadline = min(opts.deadline, time.time() + us / 1e6)


def _wanted(spec: ModelSpec, op: str, req: oip.InferRequest) -> dict[str, bool]:
    """Output name -> whether it goes in the binary part, in the order of the request."""
    if req.outputs is None:
        return {n: req.binary_output for n in default_outputs(spec, op)}
    return {o.name: req.binary_output if o.binary is None else o.binary for o in req.outputs}


def _choice(params: dict[str, Any], key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = params.get(key, default)
    if value not in allowed:
        raise InvalidValue(f"parameters.{key} must be one of {list(allowed)}, got {str(value)[:40]!r}")
    return str(value)


def _batch(t: oip.InferInput, ndim: int, state: AppState, layout: str) -> int:
    """The batch size of ``t`` (its first dimension), checked against its layout and the request limit."""
    if len(t.shape) != ndim:
        raise InvalidValue(f"input {t.name} has shape {list(t.shape)}; it takes {layout}")
    b = t.shape[0]
    limit = state.settings.max_images_per_request
    if not 1 <= b <= limit:
        raise InvalidValue(f"input {t.name} has a batch of {b}; it takes 1..{limit} per request")
    return b


def _datatype(t: oip.InferInput, allowed: tuple[str, ...], model: str) -> None:
    if t.datatype not in allowed:
        raise InvalidValue(f"input {t.name} of datatype {t.datatype} is not accepted by {model}: send "
                           f"{allowed[0]}" + (f" (also {', '.join(allowed[1:])})" if len(allowed) > 1 else ""))


async def _encode(request: Request, state: AppState, opts: RequestOptions, spec: ModelSpec,
                  req: oip.InferRequest) -> tuple[dict[str, Any], dict[str, Any]]:
    model = f"{spec.name}.encode"
    mode = _choice(req.parameters, "preprocess", "center-crop", ("center-crop", "resize"))
    pixels, files = req.input("IMAGE"), req.input("IMAGE_BYTES")
    if (pixels is None) == (files is None):
        raise InvalidValue(f"model {model} takes one input: IMAGE UINT8 (B, H, W, 3) or IMAGE_BYTES BYTES (B,)")
    if pixels is not None:
        _datatype(pixels, ("UINT8",), model)
        _batch(pixels, 4, state, "(B, H, W, 3)")
        if pixels.shape[3] != 3 or min(pixels.shape[1:3]) < 1:
            raise InvalidValue(f"input IMAGE has shape {list(pixels.shape)}; it takes (B, H, W, 3) RGB pixels, "
                               "H and W at least 1")
        arr = pixels.data
        assert isinstance(arr, np.ndarray)
        enc = await valid_encode_pixels(state, arr, spec.name, mode)
    else:
        assert files is not None
        _datatype(files, ("BYTES",), model)
        _batch(files, 1, state, "(B,): one image file per element")
        blobs = [decode_base64(x, f"IMAGE_BYTES[{i}]") if isinstance(x, str) else x for i, x in enumerate(files.data)]
        enc = await valid_encode(state, blobs, spec.name, mode)
    result = await run_job(request, state, opts, enc)
    out = signature(spec, "encode")[1][0]
    tokens = result.tensors["tokens"].to(torch.int64 if spec.discrete else torch.float32)
    return {out.name: tokens.numpy()}, {}


async def _decode(request: Request, state: AppState, opts: RequestOptions, spec: ModelSpec,
                  req: oip.InferRequest, wanted: dict[str, bool]) -> tuple[dict[str, Any], dict[str, Any]]:
    model = f"{spec.name}.decode"
    fmt = _choice(req.parameters, "format", "png", IMAGE_FORMATS)
    want = signature(spec, "decode")[0][0]
    t = req.input(want.name)
    if t is None:
        raise InvalidValue(f"model {model} takes one input: {_describe([want])}")
    _datatype(t, ("INT64", *(d for d in oip.INT_TYPES if d != "INT64")) if spec.discrete
              else ("FP32", "FP16", "FP64", "BF16"), model)
    dec = await valid_decode(state, "array", t.data, spec.name, fmt)
    result = await run_job(request, state, opts, dec)
    return await state.codec(_image_outputs, result.tensors["images"], wanted, fmt, state.settings,
                             cost=result.tensors["images"].numel()), {}


async def _generate(request: Request, state: AppState, opts: RequestOptions, spec: ModelSpec,
                    req: oip.InferRequest, wanted: dict[str, bool]) -> tuple[dict[str, Any], dict[str, Any]]:
    fmt = _choice(req.parameters, "format", "png", IMAGE_FORMATS)
    t = req.input("CLASS")
    if t is None:
        raise InvalidValue(f"model {spec.name} takes one input: CLASS INT64 (B,), an ImageNet-1k class id per image")
    _datatype(t, ("INT64", *(d for d in oip.INT_TYPES if d != "INT64")), spec.name)
    b = _batch(t, 1, state, "(B,): one class id per image")
    assert isinstance(t.data, np.ndarray)
    classes = [int(c) for c in t.data.reshape(-1)]
    for c in classes:
        if c not in spec.classes:
            raise InvalidValue(f"class {c} is not served by {spec.name}: valid ids are {describe_classes(spec)}")
    gen = {k: req.parameters[k] for k in OP_PARAMETERS["generate"] if k in req.parameters and k != "format"}
    latents = signature(spec, "generate")[1][2].name
    v = valid_generate(state, {**gen, "model": spec.name, "class": classes[0], "num_images": b,
                               "return_latents": latents in wanted}, opts.idempotency_key)
    v = dataclasses.replace(v, row_classes=tuple(classes))
    result = await run_job(request, state, opts, v)
    images = result.tensors["images"]
    values = await state.codec(_image_outputs, images, wanted, fmt, state.settings, cost=images.numel())
    if latents in wanted:
        values[latents] = result.tensors["latents"].to(torch.int64 if spec.discrete else torch.float32).numpy()
    return values, {"seed": v.seed, "steps": v.steps, "cfg_scale": v.cfg_scale, "sampler": v.sampler}


def _image_outputs(images: torch.Tensor, wanted: dict[str, bool], fmt: str, settings: Settings) -> dict[str, Any]:
    """``IMAGE`` (B, H, W, 3) uint8 (the pixels the native routes' image files hold) and ``IMAGE_BYTES`` files
    (:func:`server.render.image_files`), as far as ``wanted``."""
    out: dict[str, Any] = {}
    if "IMAGE" in wanted:
        out["IMAGE"] = to_uint8(images)
    if "IMAGE_BYTES" in wanted:
        out["IMAGE_BYTES"] = image_files(images, fmt, settings)
    return out

