"""The jobs API's work, apart from HTTP: turn a ``POST /v1/jobs`` JSON body (the JSON body of a synchronous
route plus ``op``) into a validated payload, and render a job (state, progress, result) as JSON.

Validation is the synchronous routes' own (``parse_model`` of their schemas, ``validate_tokens``,
``validate_generate``), so a body valid for ``POST /v1/<op>`` is valid here and gives the same result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from server.admission import decode_images, parse_tokens
from server.codecs import b64, decode_base64, encode_images, tensor_to_json
from server.errors import InvalidValue
from server.queue.base import (
    OPS,
    DecodePayload,
    EncodePayload,
    GeneratePayload,
    JobInfo,
    Payload,
)
from server.routes.common import fingerprint
from server.schemas import EncodeJSONRequest, GeneratedImage, GenerateParams, GenerateResponse
from server.settings import Settings
from server.state import AppState
from server.validation import ValidGenerate, decode_body, parse_model, validate_generate

JOB_FIELDS = ("op", "priority", "deadline_ms")  # what a jobs body adds to a synchronous route's body


@dataclass
class Prepared:
    """A validated job: its model, payload, request fingerprint (idempotency) and what renders its result."""

    op: str
    model: str
    payload: Payload
    fingerprint: str
    meta: dict[str, Any]


async def prepare(op: object, body: dict[str, Any], state: AppState, idempotency_key: str | None) -> Prepared:
    """Validate ``body`` (without the jobs fields) as the body of ``POST /v1/<op>``."""
    if op not in OPS:
        raise InvalidValue(f"op must be one of {list(OPS)}, got {op!r}")
    if op == "encode":
        return await _encode(body, state)
    if op == "decode":
        return await _decode(body, state)
    return _generate(body, state, idempotency_key)


async def _encode(body: dict[str, Any], state: AppState) -> Prepared:
    s = state.settings
    req: EncodeJSONRequest = parse_model(EncodeJSONRequest, body)
    if (req.image is None) == (req.images is None):
        raise InvalidValue('give exactly one of "image" (base64) or "images" (list of base64)')
    texts = [req.image] if req.image is not None else list(req.images or [])
    if not texts:
        raise InvalidValue("no image in the request")
    if len(texts) > s.max_images_per_request:
        raise InvalidValue(f"{len(texts)} images; at most {s.max_images_per_request} per request")
    blobs = [decode_base64(t, f"images[{i}]") for i, t in enumerate(texts)]
    spec = state.models.tokenizer(req.model)
    mode = req.preprocess or "center-crop"
    images = await decode_images(state, spec.name, spec.image_size, blobs, mode)
    return Prepared("encode", spec.name, EncodePayload(images), fingerprint("encode", spec.name, mode, *blobs),
                    {"model": spec.name})


async def _decode(body: dict[str, Any], state: AppState) -> Prepared:
    tensor, model, fmt = decode_body(body)
    spec = state.models.tokenizer(model)
    fmt = fmt or "png"
    tokens = await parse_tokens(state, spec, "json", tensor)
    return Prepared("decode", spec.name, DecodePayload(tokens), fingerprint("decode", spec.name, fmt, tokens),
                    {"model": spec.name, "format": fmt})


def _generate(body: dict[str, Any], state: AppState, idempotency_key: str | None) -> Prepared:
    p: GenerateParams = parse_model(GenerateParams, body)
    spec = state.models.generator(p.model)
    v = validate_generate(p, spec, state.settings, idempotency_key)
    payload = GeneratePayload(v.requests(), return_latents=v.return_latents)
    return Prepared("generate", spec.name, payload, fingerprint("generate", spec.name, v.fingerprint()),
                    {"generate": dataclasses.asdict(v), "format": p.format or "png"})


# ---------------------------------------------------------------------------------------------- rendering
def render_result(info: JobInfo, settings: Settings) -> dict[str, Any] | None:
    """The result of a completed job as the synchronous route's JSON body (images always base64)."""
    if info.result is None:
        return None
    t = info.result.tensors
    if info.op == "encode":
        return {"model": info.model, **tensor_to_json(t["tokens"])}
    if info.op == "decode":
        fmt = info.meta.get("format", "png")
        if fmt == "npy":
            array = tensor_to_json(t["images"].clamp(-1.0, 1.0))
            return {"model": info.model, "format": "npy", "array": array}
        files = _files(t["images"], fmt, settings)
        return {"model": info.model, "format": fmt, "images": [b64(f) for f in files]}
    v = ValidGenerate(**{**info.meta["generate"], "guidance_interval": tuple(info.meta["generate"]
                                                                              ["guidance_interval"])})
    fmt = info.meta.get("format", "png")
    body = GenerateResponse(
        model=v.model, class_id=v.class_id, seed=v.seed, cfg_scale=v.cfg_scale,
        guidance_interval=v.guidance_interval, steps=v.steps, sampler=v.sampler,
        images=[GeneratedImage(seed=v.seed + i, format=fmt, data=b64(f))
                for i, f in enumerate(_files(t["images"], fmt, settings))],
    ).model_dump(by_alias=True)
    if "latents" in t:
        body["latents"] = tensor_to_json(t["latents"])
    else:
        body.pop("latents", None)
    return body


def _files(images: torch.Tensor, fmt: str, s: Settings) -> list[bytes]:
    return encode_images(images, fmt, jpeg_quality=s.jpeg_quality, webp_quality=s.webp_quality,
                         png_compress_level=s.png_compress_level)


def job_body(info: JobInfo, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """``GET /v1/jobs/{id}``: the job's state (and ``result`` once completed)."""
    progress = None if info.steps is None else {"step": info.step or 0, "steps": info.steps}
    return {"id": info.id, "op": info.op, "model": info.model, "status": info.status,
            "priority": info.priority, "request_id": info.request_id, "submitted_at": info.submitted_at, "started_at": info.started_at,
            "finished_at": info.finished_at, "deadline": info.deadline, "deliveries": info.deliveries,
            "progress": progress, "error": info.error, "result": result}
