"""POST /v1/generate (alias /generate): class-conditional generation, step-level batched."""

from __future__ import annotations

from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.codecs import IMAGE_MEDIA_TYPES, b64, encode_images, tensor_to_json
from server.deps import OptionsDep, StateDep
from server.errors import BadRequest, InvalidValue, UnsupportedMediaType
from server.queue.base import GeneratePayload
from server.routes.common import BINARY, content_type, negotiate, read_json, request_body, run_job, schema_ref
from server.schemas import ERROR_RESPONSES, GeneratedImage, GenerateParams, GenerateResponse
from server.settings import Settings
from server.validation import ValidGenerate, parse_model, validate_generate

router = APIRouter()

OPENAPI = {
    **request_body({"application/json": schema_ref("GenerateParams")}, required=False),
    "parameters": [
        {"name": n, "in": "query", "required": False, "schema": sch, "description": d}
        for n, sch, d in (
            ("class", {"type": "integer", "minimum": 0}, "ImageNet-1k class id (alias class_id)"),
            ("class_id", {"type": "integer", "minimum": 0}, "alias of class"),
            ("num_images", {"type": "integer", "minimum": 1}, "images; image i uses seed + i"),
            ("cfg_scale", {"type": "number", "minimum": 0, "maximum": 100}, "guidance scale"),
            ("guidance_low", {"type": "number", "minimum": 0, "maximum": 1}, "guidance interval start"),
            ("guidance_high", {"type": "number", "minimum": 0, "maximum": 1}, "guidance interval end"),
            ("steps", {"type": "integer", "minimum": 1}, "denoising steps"),
            ("sampler", {"type": "string"}, "SiT: euler, heun, sde; DiT: ddpm, ddim; MAR: mar; MaskGIT: maskgit; VAR: var"),
            ("seed", {"type": "integer", "minimum": 0, "maximum": 2**53}, "random when absent"),
            ("format", {"type": "string", "enum": ["png", "jpeg", "webp"]}, "image format"),
            ("return_latents", {"type": "boolean"}, "also return tokens"),
            ("model", {"type": "string"}, "generator name"),
        )
    ],
}
RESPONSES = {**ERROR_RESPONSES, 200: {
    "model": GenerateResponse,
    "description": "JSON; with Accept: image/* and num_images = 1 the image itself (seed in x-seed)",
    "content": {"image/png": BINARY, "image/jpeg": BINARY, "image/webp": BINARY}}}
_OFFERED = ["application/json", *IMAGE_MEDIA_TYPES.values()]
_FORMAT_OF = {v: k for k, v in IMAGE_MEDIA_TYPES.items()}


async def _params(request: Request) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for k in request.query_params:
        values = request.query_params.getlist(k)
        if len(values) > 1:
            raise InvalidValue(f"query parameter {k[:40]!r} is given {len(values)} times")
        params[k] = values[0]
    body = await request.body()
    if body.strip():
        if content_type(request) != "application/json":
            raise UnsupportedMediaType("the generate body must be application/json (or use query parameters)")
        data = await read_json(request)
        if not isinstance(data, dict):
            raise BadRequest("the JSON body must be an object of parameters")
        params.update(data)
    return params


def _render(v: ValidGenerate, images: torch.Tensor, latents: torch.Tensor | None, fmt: str, as_image: bool,
            settings: Settings) -> Response:
    files = encode_images(images, fmt, jpeg_quality=settings.jpeg_quality, webp_quality=settings.webp_quality,
                          png_compress_level=settings.png_compress_level)
    if as_image:
        return Response(files[0], media_type=IMAGE_MEDIA_TYPES[fmt], headers={"x-seed": str(v.seed)})
    body = GenerateResponse(
        model=v.model, class_id=v.class_id, seed=v.seed, cfg_scale=v.cfg_scale, guidance_interval=v.guidance_interval,
        steps=v.steps, sampler=v.sampler,
        images=[GeneratedImage(seed=v.seed + i, format=fmt, data=b64(f)) for i, f in enumerate(files)],  # type: ignore[arg-type]
    ).model_dump(by_alias=True)
    if latents is not None:
        body["latents"] = tensor_to_json(latents)
    else:
        body.pop("latents", None)
    return JSONResponse(body, headers={"x-seed": str(v.seed)})


@router.post("/v1/generate", openapi_extra=OPENAPI, responses=RESPONSES, response_model=GenerateResponse,
             summary="Generate images of a class")
async def generate(request: Request, state: StateDep, opts: OptionsDep) -> Response:
    """Parameters as query or JSON fields (JSON wins); defaults from the generator's config. Each image
    runs as one row of the step-level batch, with its own seed (``seed + i``), so the result does not depend
    on what else runs. With an Idempotency-Key and no seed, the seed is derived from the key."""
    state.check_ready()
    p: GenerateParams = parse_model(GenerateParams, await _params(request))
    spec = state.models.generator(p.model)
    v = validate_generate(p, spec, state.settings, opts.idempotency_key)
    result = await run_job(request, state, opts, spec.name,
                           GeneratePayload(v.requests(), return_latents=v.return_latents), (v.fingerprint(),))
    wanted = negotiate(request.headers.get("accept"), _OFFERED)
    as_image = wanted in _FORMAT_OF and v.num_images == 1
    fmt = _FORMAT_OF[wanted] if as_image and wanted else (p.format or _FORMAT_OF.get(wanted or "", "png"))
    images = result.tensors["images"]
    return await state.codec(_render, v, images, result.tensors.get("latents"), fmt, as_image, state.settings,
                             cost=images.numel())


router.add_api_route("/generate", generate, methods=["POST"], include_in_schema=False, openapi_extra=OPENAPI)  # same query parameters
