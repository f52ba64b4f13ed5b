"""Results -> responses, once: the synchronous routes, the jobs API and the Open Inference Protocol routes all
render through here, so an image file, a generate body or a tensor looks the same whichever route made it.

Synchronous and CPU-bound (PNG / JPEG / WebP encoding, base64): callers run these in the codec pool. Images
come in as the runtimes return them: float32 (B, 3, H, W) in [-1, 1] (clamped here); tokens as (B, L, D)
float32 latents or int64 codes (B, *code shape).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from fastapi.responses import JSONResponse, Response

from server.codecs import (
    IMAGE_MEDIA_TYPES,
    NPY,
    SAFETENSORS,
    b64,
    encode_images,
    tensor_to_json,
    tensor_to_npy,
    tensor_to_safetensors,
)
from server.queue.base import JobInfo
from server.schemas import DecodeImagesResponse, GeneratedImage, GenerateResponse
from server.settings import Settings

FORMAT_OF_MEDIA = {v: k for k, v in IMAGE_MEDIA_TYPES.items()}  # "image/png" -> "png"


def negotiate(accept: str | None, offered: list[str]) -> str | None:
    """The offered media type the ``Accept`` header prefers (q-values honoured, first listed wins ties);
    None when the header is absent or only wildcards match."""
    if not accept:
        return None
    best: tuple[float, int, str] | None = None
    for i, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        q = 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
                if not (math.isfinite(q) and 0.0 <= q <= 1.0):
                    q = 0.0
        if media in offered and q > 0 and (best is None or q > best[0]):
            best = (q, i, media)
    return best[2] if best else None


# ---------------------------------------------------------------------------------------------- images


def image_files(images: torch.Tensor, fmt: str, settings: Settings) -> list[bytes]:
    """(B, 3, H, W) float in [-1, 1] -> B image files in ``fmt`` (png / jpeg / webp), with the settings'
    quality (``JPEG_QUALITY``, ``WEBP_QUALITY``, ``PNG_COMPRESS_LEVEL``)."""
    return encode_images(images, fmt, jpeg_quality=settings.jpeg_quality, webp_quality=settings.webp_quality,
                         png_compress_level=settings.png_compress_level)


# ---------------------------------------------------------------------------------------------- encode


def tokens_json(model: str, tokens: torch.Tensor) -> dict[str, Any]:
    """The JSON body of an encode (:class:`server.schemas.EncodeResponse`): the tensor and its model."""
    return {"model": model, **tensor_to_json(tokens)}


def tensor_response(t: torch.Tensor, accept: str | None, model: str, name: str = "tokens") -> Response:
    """An encode's answer: JSON (default, with ``model``), ``.npy`` or safetensors (tensor ``name``), as
    ``Accept`` asks."""
    kind = negotiate(accept, ["application/json", NPY, SAFETENSORS])
    if kind == NPY:
        return Response(tensor_to_npy(t), media_type=NPY)
    if kind == SAFETENSORS:
        return Response(tensor_to_safetensors(t, name), media_type=SAFETENSORS)
    return JSONResponse(tokens_json(model, t))


# ---------------------------------------------------------------------------------------------- decode


def decode_json(model: str, images: torch.Tensor, fmt: str, settings: Settings) -> dict[str, Any]:
    """A decode as JSON whatever B: ``npy`` -> ``{"array": tensor (B, 3, H, W) in [-1, 1]}``, else base64
    files (:class:`server.schemas.DecodeImagesResponse`). The jobs API's result."""
    if fmt == "npy":
        return {"model": model, "format": "npy", "array": tensor_to_json(images.clamp(-1.0, 1.0))}
    files = image_files(images, fmt, settings)
    return DecodeImagesResponse(model=model, format=fmt, images=[b64(f) for f in files]).model_dump()  # type: ignore[arg-type]


def decode_response(model: str, images: torch.Tensor, fmt: str, settings: Settings) -> Response:
    """``POST /v1/decode``'s answer: ``npy`` -> the (B, 3, H, W) float32 array; B = 1 -> the image file;
    B > 1 -> :func:`decode_json`."""
    if fmt == "npy":
        return Response(tensor_to_npy(images.clamp(-1.0, 1.0)), media_type=NPY)
    if images.shape[0] == 1:
        return Response(image_files(images, fmt, settings)[0], media_type=IMAGE_MEDIA_TYPES[fmt])
    return JSONResponse(decode_json(model, images, fmt, settings))


# ---------------------------------------------------------------------------------------------- generate


def generate_json(summary: dict[str, Any], images: torch.Tensor, latents: torch.Tensor | None, fmt: str,
                  settings: Settings) -> dict[str, Any]:
    """The JSON body of a generation (:class:`server.schemas.GenerateResponse`). ``summary`` is
    :meth:`server.validation.ValidGenerate.summary` (model, class, seed, cfg_scale, guidance_interval, steps,
    sampler); image i carries seed + i; ``latents`` (B, L, D) or codes only with ``return_latents``."""
    files = image_files(images, fmt, settings)
    seed = int(summary["seed"])
    body = GenerateResponse.model_validate({
        **summary, "images": [GeneratedImage(seed=seed + i, format=fmt, data=b64(f))  # type: ignore[arg-type]
                              for i, f in enumerate(files)]}).model_dump(by_alias=True)
    if latents is not None:
        body["latents"] = tensor_to_json(latents)
    else:
        body.pop("latents", None)
    return body


def generate_response(summary: dict[str, Any], images: torch.Tensor, latents: torch.Tensor | None, fmt: str,
                      as_image: bool, settings: Settings) -> Response:
    """``POST /v1/generate``'s answer, the seed in ``x-seed``: the image file itself when ``as_image`` (one
    image asked for with ``Accept: image/*``), else :func:`generate_json`."""
    headers = {"x-seed": str(summary["seed"])}
    if as_image:
        return Response(image_files(images, fmt, settings)[0], media_type=IMAGE_MEDIA_TYPES[fmt], headers=headers)
    return JSONResponse(generate_json(summary, images, latents, fmt, settings), headers=headers)


# ---------------------------------------------------------------------------------------------- jobs


def job_result(info: JobInfo, settings: Settings) -> dict[str, Any] | None:
    """The result of a completed job as its synchronous route's JSON body (images always base64); None
    before it completes. ``info.meta`` is what :mod:`server.jobs` stored at submission (format, summary)."""
    if info.result is None:
        return None
    t = info.result.tensors
    fmt = str(info.meta.get("format", "png"))
    if info.op == "encode":
        return tokens_json(info.model, t["tokens"])
    if info.op == "decode":
        return decode_json(info.model, t["images"], fmt, settings)
    return generate_json(info.meta["generate"], t["images"], t.get("latents"), fmt, settings)


def job_body(info: JobInfo, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """``GET /v1/jobs/{id}`` (:class:`server.schemas.JobResponse`): the job's state, and ``result`` once
    completed."""
    progress = None if info.steps is None else {"step": info.step or 0, "steps": info.steps}
    return {"id": info.id, "op": info.op, "model": info.model, "status": info.status, "priority": info.priority,
            "request_id": info.request_id, "submitted_at": info.submitted_at, "started_at": info.started_at,
            "finished_at": info.finished_at, "deadline": info.deadline, "deliveries": info.deliveries,
            "progress": progress, "error": info.error, "result": result}
