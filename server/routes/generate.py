"""POST /v1/generate (alias /generate): class-conditional generation, step-level batched."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from server.codecs import IMAGE_MEDIA_TYPES
from server.deps import OptionsDep, StateDep
from server.errors import InvalidValue, UnsupportedMediaType
from server.render import FORMAT_OF_MEDIA, generate_response, negotiate
from server.routes.common import BINARY, content_type, read_json, request_body, run_job, schema_ref
from server.schemas import ERROR_RESPONSES, GenerateQuery, GenerateResponse
from server.validation import ValidGenerate, merge_generate, valid_generate

router = APIRouter()

OPENAPI = request_body({"application/json": schema_ref("GenerateParams")}, required=False)
RESPONSES = {**ERROR_RESPONSES, 200: {
    "model": GenerateResponse,
    "description": "JSON; with Accept: image/* and num_images = 1 the image itself (seed in x-seed)",
    "content": {"image/png": BINARY, "image/jpeg": BINARY, "image/webp": BINARY}}}
_OFFERED = ["application/json", *IMAGE_MEDIA_TYPES.values()]


async def generate_request(request: Request, state: StateDep, opts: OptionsDep,
                           query: Annotated[GenerateQuery, Query()]) -> ValidGenerate:
    """The request's :class:`ValidGenerate`: the query parameters (:class:`GenerateQuery`), overridden field by
    field by a JSON body (:class:`GenerateParams`), against the generator's defaults and the limits."""
    state.check_ready()
    repeated = sorted({k for k in request.query_params if len(request.query_params.getlist(k)) > 1})
    if repeated:
        k = repeated[0]
        raise InvalidValue(f"query parameter {k[:40]!r} is given {len(request.query_params.getlist(k))} times")
    body = None
    if (await request.body()).strip():
        if content_type(request) != "application/json":
            raise UnsupportedMediaType("the generate body must be application/json (or use query parameters)")
        body = await read_json(request)
    return valid_generate(state, merge_generate(query, body), opts.idempotency_key)


@router.post("/v1/generate", openapi_extra=OPENAPI, responses=RESPONSES, response_model=GenerateResponse,
             summary="Generate images of a class")
async def generate(request: Request, state: StateDep, opts: OptionsDep,
                   req: Annotated[ValidGenerate, Depends(generate_request)]) -> Response:
    """Parameters as query or JSON fields (JSON wins); defaults from the generator's config. Each image
    runs as one row of the step-level batch, with its own seed (``seed + i``), so the result does not depend
    on what else runs. With an Idempotency-Key and no seed, the seed is derived from the key."""
    result = await run_job(request, state, opts, req)
    wanted = negotiate(request.headers.get("accept"), _OFFERED)
    as_image = wanted in FORMAT_OF_MEDIA and req.num_images == 1
    fmt = FORMAT_OF_MEDIA[wanted] if as_image and wanted else (req.format or FORMAT_OF_MEDIA.get(wanted or "", "png"))
    images = result.tensors["images"]
    return await state.codec(generate_response, req.summary(), images, result.tensors.get("latents"), fmt, as_image,
                             state.settings, cost=images.numel())


router.add_api_route("/generate", generate, methods=["POST"], include_in_schema=False)
