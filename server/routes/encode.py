"""POST /v1/encode (alias /encode): images -> tokens (B, L, D)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from server.admission import decode_raw_image
from server.codecs import IMAGE_MEDIA_TYPES, NPY, SAFETENSORS
from server.deps import OptionsDep, StateDep
from server.errors import BadRequest, InvalidValue, UnsupportedMediaType
from server.render import tensor_response
from server.routes.common import (
    BINARY,
    content_type,
    read_json,
    request_body,
    run_job,
    schema_ref,
)
from server.schemas import ERROR_RESPONSES, EncodeForm, EncodeResponse, PreprocessMode
from server.validation import ValidEncode, encode_spec, valid_encode, valid_encode_json

router = APIRouter()

OPENAPI = request_body({
    "multipart/form-data": {"schema": EncodeForm.model_json_schema()},
    "image/png": BINARY, "image/jpeg": BINARY, "image/webp": BINARY,
    "application/json": schema_ref("EncodeJSONRequest"),
})
RESPONSES = {**ERROR_RESPONSES, 200: {"model": EncodeResponse, "description": "tokens (B, L, D)", "content": {
    NPY: BINARY, SAFETENSORS: BINARY}}}


ENCODE_FORM_FIELDS = tuple(EncodeForm.model_fields)  # image, model, preprocess


async def _form_images(request: Request, max_images: int) -> tuple[list[bytes], dict[str, str]]:
    """The image files of a multipart body, and the parameters given as its text fields."""
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


async def encode_request(request: Request, state: StateDep,
                         model: Annotated[str | None, Query(description="tokenizer name")] = None,
                         preprocess: Annotated[PreprocessMode | None,
                                               Query(description="center-crop or resize")] = None,
                         ) -> ValidEncode:
    """The request's :class:`ValidEncode`, from its query and its body in any of the accepted forms (query
    parameters win over body fields). A raw image body is admitted on its first bytes, before it is read."""
    state.check_ready()
    ctype = content_type(request)
    if ctype == "application/json":
        return await valid_encode_json(state, await read_json(request), model, preprocess)
    if ctype == "multipart/form-data":
        blobs, params = await _form_images(request, state.settings.max_images_per_request)
        return await valid_encode(state, blobs, model or params.get("model"),
                                  preprocess or params.get("preprocess"))
    if ctype in IMAGE_MEDIA_TYPES.values():
        spec, mode = encode_spec(state, model, preprocess)
        images, body = await decode_raw_image(state, spec.name, spec.image_size, request, mode)
        return ValidEncode(spec.name, images, mode, (body,))
    raise UnsupportedMediaType(f"content type {ctype or '(none)'!r} is not accepted: send multipart/form-data, "
                               "image/png, image/jpeg, image/webp or application/json")


@router.post("/v1/encode", openapi_extra=OPENAPI, responses=RESPONSES, response_model=EncodeResponse,
             summary="Images to tokens")
async def encode(request: Request, state: StateDep, opts: OptionsDep,
                 req: Annotated[ValidEncode, Depends(encode_request)]) -> Response:
    """Tokenize images given as a multipart upload (field ``image``, repeatable), a raw image body, or JSON
    with base64. ``Accept: application/x-npy`` or ``application/vnd.safetensors`` returns binary tokens.
    Admission (queue capacity, pixel limits read from the image headers) comes before any decoding."""
    result = await run_job(request, state, opts, req)
    tokens = result.tensors["tokens"]
    return await state.codec(tensor_response, tokens, request.headers.get("accept"), req.model,
                             cost=4 * tokens.numel())


router.add_api_route("/encode", encode, methods=["POST"], include_in_schema=False)
