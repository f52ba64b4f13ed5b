"""POST /v1/decode (alias /decode): tokens (B, L, D), or integer codes of a discrete tokenizer -> images."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from server.codecs import IMAGE_MEDIA_TYPES, NPY, SAFETENSORS
from server.deps import OptionsDep, StateDep
from server.errors import UnsupportedMediaType
from server.render import decode_response, negotiate
from server.routes.common import BINARY, content_type, read_json, request_body, run_job, schema_ref
from server.schemas import ERROR_RESPONSES, DecodeFormat
from server.validation import ValidDecode, valid_decode, valid_decode_json

router = APIRouter()

OPENAPI = request_body({"application/json": schema_ref("DecodeJSONRequest"), NPY: BINARY, SAFETENSORS: BINARY})
RESPONSES = {**ERROR_RESPONSES, 200: {
    "description": "B = 1: the image file; B > 1: JSON with base64 images; npy: (B, 3, H, W) float32 in [-1, 1]",
    "content": {"image/png": BINARY, "image/jpeg": BINARY, "image/webp": BINARY, NPY: BINARY,
                "application/json": schema_ref("DecodeImagesResponse")}}}
_FORMATS_BY_TYPE = {v: k for k, v in IMAGE_MEDIA_TYPES.items()} | {NPY: "npy"}


async def decode_request(request: Request, state: StateDep,
                         model: Annotated[str | None, Query(description="tokenizer name")] = None,
                         format: Annotated[DecodeFormat | None, Query(description="png, jpeg, webp or npy")] = None,
                         ) -> ValidDecode:
    """The request's :class:`ValidDecode`: tokens from a JSON tensor, ``.npy`` or safetensors body; the model
    and format from the query, else the JSON body, else (format) ``Accept``, else PNG."""
    state.check_ready()
    ctype = content_type(request)
    if ctype == "application/json":
        return await valid_decode_json(state, await read_json(request), model, format, _accepted(request))
    if ctype in (NPY, SAFETENSORS):
        kind = "npy" if ctype == NPY else "safetensors"
        return await valid_decode(state, kind, await request.body(), model, format or _accepted(request))
    raise UnsupportedMediaType(f"content type {ctype or '(none)'!r} is not accepted: send application/json, "
                               f"{NPY} or {SAFETENSORS}")


def _accepted(request: Request) -> str | None:
    return _FORMATS_BY_TYPE.get(negotiate(request.headers.get("accept"), list(_FORMATS_BY_TYPE)) or "")


@router.post("/v1/decode", openapi_extra=OPENAPI, responses=RESPONSES, summary="Tokens to images")
async def decode(request: Request, state: StateDep, opts: OptionsDep,
                 req: Annotated[ValidDecode, Depends(decode_request)]) -> Response:
    """Decode tokens (B, L, D) or (L, D) given as a JSON tensor, ``.npy`` or safetensors (tensor ``tokens``);
    for a discrete tokenizer, integer codes (B, *code shape) in [0, codebook size) (``GET /v1/models``).
    The format comes from ``format``, else ``Accept``, else PNG."""
    result = await run_job(request, state, opts, req)
    images = result.tensors["images"]
    return await state.codec(decode_response, req.model, images, req.format, state.settings, cost=images.numel())


router.add_api_route("/decode", decode, methods=["POST"], include_in_schema=False)
