"""POST /v1/decode (alias /decode): tokens (B, L, D), or integer codes of a discrete tokenizer -> images."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from server.admission import parse_tokens
from server.codecs import IMAGE_MEDIA_TYPES, NPY, SAFETENSORS, b64, encode_images, tensor_to_npy
from server.deps import OptionsDep, StateDep
from server.errors import UnsupportedMediaType
from server.queue.base import DecodePayload
from server.routes.common import BINARY, content_type, negotiate, read_json, request_body, run_job, schema_ref
from server.schemas import ERROR_RESPONSES, DecodeFormat, DecodeImagesResponse
from server.settings import Settings
from server.validation import decode_body

router = APIRouter()

OPENAPI = request_body({"application/json": schema_ref("DecodeJSONRequest"), NPY: BINARY, SAFETENSORS: BINARY})
RESPONSES = {**ERROR_RESPONSES, 200: {
    "description": "B = 1: the image file; B > 1: JSON with base64 images; npy: (B, 3, H, W) float32 in [-1, 1]",
    "content": {"image/png": BINARY, "image/jpeg": BINARY, "image/webp": BINARY, NPY: BINARY,
                "application/json": schema_ref("DecodeImagesResponse")}}}
_FORMATS_BY_TYPE = {v: k for k, v in IMAGE_MEDIA_TYPES.items()} | {NPY: "npy"}


async def _read_tokens(request: Request) -> tuple[tuple[str, Any], dict[str, Any]]:
    ctype = content_type(request)
    if ctype == "application/json":
        tensor, model, fmt = decode_body(await read_json(request))
        return ("json", tensor), {"model": model, "format": fmt}
    if ctype == NPY:
        return ("npy", await request.body()), {}
    if ctype == SAFETENSORS:
        return ("safetensors", await request.body()), {}
    raise UnsupportedMediaType(f"content type {ctype or '(none)'!r} is not accepted: send application/json, "
                               f"{NPY} or {SAFETENSORS}")


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
    (kind, raw), body_params = await _read_tokens(request)
    spec = state.models.tokenizer(model or body_params.get("model"))
    fmt = format or body_params.get("format") or _FORMATS_BY_TYPE.get(
        negotiate(request.headers.get("accept"), list(_FORMATS_BY_TYPE)) or "", "png")
    tokens = await parse_tokens(state, spec, kind, raw)
    result = await run_job(request, state, opts, spec.name, DecodePayload(tokens), (fmt, tokens))
    images = result.tensors["images"]
    return await state.codec(_render, images, fmt, spec.name, state.settings, cost=images.numel())


router.add_api_route("/decode", decode, methods=["POST"], include_in_schema=False)
