"""The HTTP protocol of docs/API.md as pure functions: build a request, parse a response.

Shared by :class:`tokserve.Client` and :class:`tokserve.AsyncClient`, which only add transport, retries and
sleeping. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np

from . import _tensors
from ._images import ImageInput, load_image, split_images, to_image_bytes
from .types import DecodeResult, GenerateResult, Latents, ModelInfo, ModelList, Timings

Transport = Literal["npy", "safetensors", "json"]
ImageFormat = Literal["png", "jpeg", "webp"]

_ACCEPT = {"npy": _tensors.NPY, "safetensors": _tensors.SAFETENSORS, "json": _tensors.JSON}


@dataclass
class RequestSpec:
    """One logical API call; ``idempotency_key`` is reused by every retry of it."""

    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    json: Any = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    idempotency_key: str | None = None

    def all_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.idempotency_key:
            headers["Idempotency-Key"] = self.idempotency_key
        return headers


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def encode_request(
    images: ImageInput | Sequence[ImageInput],
    *,
    model: str | None,
    preprocess: str | None,
    transport: Transport,
    idempotency_key: str | None,
) -> RequestSpec:
    """``POST /v1/encode``: one image as a raw body, several as a multipart upload (fields ``image``)."""
    items = split_images(images)
    if not items:
        raise ValueError("encode needs at least one image")
    encoded = [to_image_bytes(im) for im in items]
    spec = RequestSpec(
        "POST",
        "/v1/encode",
        params=_clean({"model": model, "preprocess": preprocess}),
        headers={"Accept": _ACCEPT[transport]},
        idempotency_key=idempotency_key or new_idempotency_key(),
    )
    if len(encoded) == 1:
        spec.content, mime = encoded[0]
        spec.headers["Content-Type"] = mime
    else:
        spec.files = [
            ("image", (f"image{i}.{mime.split('/')[1]}", data, mime))
            for i, (data, mime) in enumerate(encoded)
        ]
    return spec


def parse_encode(resp: httpx.Response, requested_model: str | None) -> Latents:
    array, model = _tensors.parse_tensor_response(resp.headers.get("content-type", ""), resp.content)
    model = model or resp.headers.get("x-model") or requested_model
    return Latents(
        array=array, model=model, timings=Timings.from_headers(resp.headers), request_id=_rid(resp)
    )


def latents_array(latents: Latents | np.ndarray) -> tuple[np.ndarray, str | None]:
    """The ``(B, L, D)`` / ``(L, D)`` array and the model name of a decode input."""
    if isinstance(latents, Latents):
        return latents.array, latents.model
    if isinstance(latents, np.ndarray):
        return latents, None
    raise TypeError(f"decode takes Latents or a numpy array, not {type(latents).__name__}")


def decode_request(
    array: np.ndarray,
    *,
    model: str | None,
    image_format: ImageFormat,
    transport: Transport,
    idempotency_key: str | None,
) -> RequestSpec:
    """``POST /v1/decode`` with the tokens as ``.npy`` (default), safetensors or a JSON tensor."""
    if array.ndim not in (2, 3):
        raise ValueError(f"latents must be (L, D) or (B, L, D); got shape {array.shape}")
    spec = RequestSpec(
        "POST",
        "/v1/decode",
        params=_clean({"model": model, "format": image_format}),
        idempotency_key=idempotency_key or new_idempotency_key(),
    )
    if transport == "json":
        spec.json = {**_tensors.to_json_tensor(array), **_clean({"model": model})}
    elif transport == "safetensors":
        spec.content = _tensors.to_safetensors(array)
        spec.headers["Content-Type"] = _tensors.SAFETENSORS
    else:
        spec.content = _tensors.to_npy(array)
        spec.headers["Content-Type"] = _tensors.NPY
    return spec


def parse_decode(resp: httpx.Response, requested_model: str | None) -> DecodeResult:
    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    model = resp.headers.get("x-model") or requested_model
    if ctype.startswith("image/"):
        images = [load_image(resp.content)]
    else:
        obj = resp.json()
        images = [load_image(base64.b64decode(_b64_of(item))) for item in obj["images"]]
        model = obj.get("model") or model
    return DecodeResult(
        images=images, model=model, timings=Timings.from_headers(resp.headers), request_id=_rid(resp)
    )


def generate_request(
    class_id: int,
    *,
    num_images: int,
    cfg_scale: float | None,
    guidance_interval: tuple[float, float] | None,
    steps: int | None,
    sampler: str | None,
    seed: int | None,
    image_format: ImageFormat | None,
    return_latents: bool,
    model: str | None,
    idempotency_key: str | None,
) -> RequestSpec:
    """``POST /v1/generate`` with a JSON body; the answer is always asked for as JSON."""
    body = _clean(
        {
            "class": int(class_id),
            "num_images": int(num_images),
            "cfg_scale": cfg_scale,
            "guidance_interval": list(guidance_interval) if guidance_interval is not None else None,
            "steps": steps,
            "sampler": sampler,
            "seed": seed,
            "format": image_format,
            "model": model,
        }
    )
    if return_latents:
        body["return_latents"] = True
    return RequestSpec(
        "POST",
        "/v1/generate",
        json=body,
        headers={"Accept": _tensors.JSON},
        idempotency_key=idempotency_key or new_idempotency_key(),
    )


def parse_generate(resp: httpx.Response) -> GenerateResult:
    timings, rid = Timings.from_headers(resp.headers), _rid(resp)
    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.startswith("image/"):
        seed = _int_or_none(resp.headers.get("x-seed"))
        return GenerateResult(
            images=[load_image(resp.content)],
            seed=seed,
            seeds=[seed] if seed is not None else [],
            timings=timings,
            request_id=rid,
        )
    obj = resp.json()
    items = obj.get("images") or []
    images = [load_image(base64.b64decode(_b64_of(item))) for item in items]
    seeds = [int(item["seed"]) for item in items if isinstance(item, dict) and item.get("seed") is not None]
    latents = obj.get("latents")
    interval = obj.get("guidance_interval")
    return GenerateResult(
        images=images,
        seed=_int_or_none(obj.get("seed")),
        seeds=seeds,
        latents=_tensors.from_json_tensor(latents) if latents else None,
        model=obj.get("model"),
        class_id=_int_or_none(obj.get("class", obj.get("class_id"))),
        cfg_scale=obj.get("cfg_scale"),
        guidance_interval=(float(interval[0]), float(interval[1])) if interval else None,
        steps=_int_or_none(obj.get("steps")),
        sampler=obj.get("sampler"),
        timings=timings,
        request_id=rid,
    )


def models_request() -> RequestSpec:
    return RequestSpec("GET", "/v1/models", headers={"Accept": _tensors.JSON})


def parse_models(resp: httpx.Response) -> ModelList:
    obj = resp.json()
    return ModelList(
        models=[ModelInfo.from_json(m) for m in obj.get("models", [])],
        default_tokenizer=obj.get("default_tokenizer"),
        default_generator=obj.get("default_generator"),
    )


def _rid(resp: httpx.Response) -> str | None:
    return resp.headers.get("x-request-id")


def _b64_of(item: Any) -> str:
    return item["data"] if isinstance(item, dict) else str(item)


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
