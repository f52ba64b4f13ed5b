"""POST /v1/encode (alias /encode): images -> tokens (B, L, D)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from server.admission import decode_images, decode_raw_image
from server.codecs import IMAGE_MEDIA_TYPES, NPY, SAFETENSORS, decode_base64
from server.deps import OptionsDep, StateDep
from server.errors import BadRequest, InvalidValue, UnsupportedMediaType
from server.queue.base import EncodePayload
from server.routes.common import (
    BINARY,
    content_type,
    read_json,
    request_body,
    run_job,
    schema_ref,
    tensor_response,
)
from server.schemas import ERROR_RESPONSES, EncodeJSONRequest, EncodeResponse, PreprocessMode
from server.validation import parse_model

router = APIRouter()

OPENAPI = request_body({
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                  "description": "one or more image files (B = number of files)"},
        "model": {"type": "string"}, "preprocess": {"type": "string", "enum": ["center-crop", "resize"]},
    }, "additionalProperties": False}},
    "image/png": BINARY, "image/jpeg": BINARY, "image/webp": BINARY,
    "application/json": schema_ref("EncodeJSONRequest"),
})
RESPONSES = {**ERROR_RESPONSES, 200: {"model": EncodeResponse, "description": "tokens (B, L, D)", "content": {
    NPY: BINARY, SAFETENSORS: BINARY}}}


ENCODE_FORM_FIELDS = ("image", "model", "preprocess")


async def _read_images(request: Request, max_images: int) -> tuple[list[bytes], dict[str, str]]:
    """The image files of the request, and parameters given in the body (form or JSON fields)."""
    ctype = content_type(request)
    if ctype == "multipart/form-data":
        form = await request.form(max_files=max_images + 1, max_fields=16)
        unknown = sorted(set(form.keys()) - set(ENCODE_FORM_FIELDS))
        if unknown:
            raise InvalidValue(f"unknown form fields {unknown[:5]}: send {list(ENCODE_FORM_FIELDS)}")
        blobs = []
        for item in form.getlist("image"):
            if not isinstance(item, UploadFile):
                raise BadRequest("multipart field 'image' must be a file upload")
            blobs.append(await item.read())
        params = {}
        for k in ("model", "preprocess"):
            values = form.getlist(k)
            if len(values) > 1 or any(not isinstance(v, str) for v in values):
                raise InvalidValue(f"form field {k!r} must be given once, as text")
            if values:
                params[k] = values[0]
        return blobs, params
    if ctype in IMAGE_MEDIA_TYPES.values():
        return [], {}  # read by decode_raw_image, after admission
    if ctype == "application/json":
        body: EncodeJSONRequest = parse_model(EncodeJSONRequest, await read_json(request))
        if (body.image is None) == (body.images is None):
            raise InvalidValue('give exactly one of "image" (base64) or "images" (list of base64)')
        texts = [body.image] if body.image is not None else list(body.images or [])
        if len(texts) > max_images:
            raise InvalidValue(f"{len(texts)} images; at most {max_images} per request")
        blobs = [decode_base64(t, f"images[{i}]") for i, t in enumerate(texts)]
        params = {k: v for k, v in (("model", body.model), ("preprocess", body.preprocess)) if v is not None}
        return blobs, params
    raise UnsupportedMediaType(f"content type {ctype or '(none)'!r} is not accepted: send multipart/form-data, "
                               "image/png, image/jpeg, image/webp or application/json")


@router.post("/v1/encode", openapi_extra=OPENAPI, responses=RESPONSES, response_model=EncodeResponse,
             summary="Images to tokens")
async def encode(request: Request, state: StateDep, opts: OptionsDep,
                 model: Annotated[str | None, Query(description="tokenizer name")] = None,
                 preprocess: Annotated[PreprocessMode | None, Query(description="center-crop or resize")] = None,
                 ) -> Response:
    """Tokenize images given as a multipart upload (field ``image``, repeatable), a raw image body, or JSON
    with base64. ``Accept: application/x-npy`` or ``application/vnd.safetensors`` returns binary tokens.
    Admission (queue capacity, pixel limits read from the image headers) comes before any decoding."""
    state.check_ready()
    s = state.settings
    blobs, body_params = await _read_images(request, s.max_images_per_request)
    model = model or body_params.get("model")
    mode = preprocess or body_params.get("preprocess") or "center-crop"
    if mode not in ("center-crop", "resize"):
        raise InvalidValue(f"preprocess must be center-crop or resize, got {mode!r}")
    spec = state.models.tokenizer(model)
    if content_type(request) in IMAGE_MEDIA_TYPES.values():
        images, body = await decode_raw_image(state, spec.name, spec.image_size, request, mode)
        blobs = [body]
    else:
        if not blobs:
            raise InvalidValue("no image in the request")
        if len(blobs) > s.max_images_per_request:
            raise InvalidValue(f"{len(blobs)} images; at most {s.max_images_per_request} per request")
        images = await decode_images(state, spec.name, spec.image_size, blobs, mode)
    result = await run_job(request, state, opts, spec.name, EncodePayload(images), (mode, *blobs))
    tokens = result.tensors["tokens"]
    return await state.codec(tensor_response, tokens, request.headers.get("accept"), {"model": spec.name},
                             cost=4 * tokens.numel())


router.add_api_route("/encode", encode, methods=["POST"], include_in_schema=False)
