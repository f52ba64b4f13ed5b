"""POST /v1/decode (alias /decode): tokens (B, L, D), or integer codes of a discrete tokenizer -> images."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from server.codecs import (
    IMAGE_MEDIA_TYPES,
    NPY,
    SAFETENSORS,
    b64,
    encode_images,
    tensor_from_json,
    tensor_from_npy,
    tensor_from_safetensors,
    tensor_to_npy,
    validate_tokens,
)
from server.deps import OptionsDep, StateDep
from server.errors import BadRequest, InvalidValue, UnsupportedMediaType
from server.queue.base import DecodePayload
from server.routes.common import BINARY, content_type, negotiate, read_json, request_body, run_job, schema_ref
from server.schemas import ERROR_RESPONSES, DecodeFormat, DecodeImagesResponse
from server.settings import Settings

router = APIRouter()

OPENAPI = request_body({"application/json": schema_ref("DecodeJSONRequest"), NPY: BINARY, SAFETENSORS: BINARY})
RESPONSES = {**ERROR_RESPONSES, 200: {
    "description": "B = 1: the image file; B > 1: JSON with base64 images; npy: (B, 3, H, W) float32 in [-1, 1]",
    "content": {"image/png": BINARY, "image/jpeg": BINARY, "image/webp": BINARY, NPY: BINARY,
                "application/json": schema_ref("DecodeImagesResponse")}}}
_FORMATS_BY_TYPE = {v: k for k, v in IMAGE_MEDIA_TYPES.items()} | {NPY: "npy"}


async def _read_tokens(request: Request) -> tuple[Any, dict[str, Any]]:
    ctype = content_type(request)
    if ctype == "application/json":
        body = await read_json(request)
        if not isinstance(body, dict):
            raise BadRequest('the JSON body must be a tensor object {"shape", "dtype", "data"}')
        params = {k: body[k] for k in ("model", "format") if body.get(k) is not None}
        return ("json", body), params
    if ctype == NPY:
        return ("npy", await request.body()), {}
    if ctype == SAFETENSORS:
        return ("safetensors", await request.body()), {}
    raise UnsupportedMediaType(f"content type {ctype or '(none)'!r} is not accepted: send application/json, "
                               f"{NPY} or {SAFETENSORS}")


def _parse(kind: str, raw: Any) -> Any:
    if kind == "json":
        return tensor_from_json(raw)
    if kind == "npy":
        return tensor_from_npy(raw)
    return tensor_from_safetensors(raw)


def _render(images: torch.Tensor, fmt: str, model: str, settings: Settings) -> Response:
    if fmt == "npy":
        return Response(tensor_to_npy(images.clamp(-1.0, 1.0)), media_type=NPY)
    files = encode_images(images, fmt, jpeg_quality=settings.jpeg_quality, webp_quality=settings.webp_quality,
                          png_compress_level=settings.png_compress_level)
    if len(files) == 1:
        return Response(files[0], media_type=IMAGE_MEDIA_TYPES[fmt])
    return JSONResponse(DecodeImagesResponse(model=model, format=fmt, images=[b64(f) for f in files])  # type: ignore[arg-type]
                        .model_dump())


@router.post("/v1/decode", openapi_extra=OPENAPI, responses=RESPONSES, summary="Tokens to images")
async def decode(request: Request, state: StateDep, opts: OptionsDep,
                 model: Annotated[str | None, Query(description="tokenizer name")] = None,
                 format: Annotated[DecodeFormat | None, Query(description="png, jpeg, webp or npy")] = None,
                 ) -> Response:
    """Decode tokens (B, L, D) or (L, D) given as a JSON tensor, ``.npy`` or safetensors (tensor ``tokens``);
    for a discrete tokenizer, integer codes (B, *code shape) in [0, codebook size) (``GET /v1/models``).
    The format comes from ``format``, else ``Accept``, else PNG."""
    state.check_ready()
    s = state.settings
    (kind, raw), body_params = await _read_tokens(request)
    spec = state.models.tokenizer(model or body_params.get("model"))
    fmt = format or body_params.get("format") or _FORMATS_BY_TYPE.get(
        negotiate(request.headers.get("accept"), list(_FORMATS_BY_TYPE)) or "", "png")
    if fmt not in ("png", "jpeg", "webp", "npy"):
        raise InvalidValue(f"format must be png, jpeg, webp or npy, got {fmt!r}")
    tokens = await state.codec(lambda: validate_tokens(_parse(kind, raw), spec.token_shape, model=spec.name,
                                                       max_rows=s.max_images_per_request,
                                                       codebook_size=spec.codebook_size))
    result = await run_job(request, state, opts, spec.name, DecodePayload(tokens), (fmt, tokens))
    return await state.codec(_render, result.tensors["images"], fmt, spec.name, s)


router.add_api_route("/decode", decode, methods=["POST"], include_in_schema=False)
