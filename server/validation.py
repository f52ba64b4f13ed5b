"""The request layer: raw request parameters become ``Valid*`` values once, at the edge; the queue, the engine
and the renderers trust them.

:class:`ValidEncode`, :class:`ValidDecode` and :class:`ValidGenerate` are built here from a request's query and
body (the synchronous routes' FastAPI dependencies: ``encode_request``, ``decode_request``,
``generate_request``), from a jobs body (:mod:`server.jobs`) or from an Open Inference Protocol request
(:mod:`server.routes.v2`), by the same functions, so one request is valid (and means the same) on every route.
Each knows its model, its queue payload and its idempotency fingerprint; :mod:`server.render` turns results
into responses.

Every problem raises a :mod:`server.errors` error that names the parameter and the valid range (422 for
values; 400 / 413 / 415 / 429 from the parsers and admission it calls).
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from models.sampling.base import SampleRequest
from server.admission import decode_images, parse_tokens, preprocess_arrays
from server.codecs import decode_base64
from server.engine.specs import ModelSpec
from server.errors import BadRequest, InvalidValue
from server.handlers import describe_validation
from server.queue.base import PRIORITY_RANGE, DecodePayload, EncodePayload, GeneratePayload, Payload
from server.schemas import MAX_DEADLINE_MS, EncodeJSONRequest, GenerateParams, GenerateQuery
from server.settings import Settings
from server.state import AppState

MAX_SEED = 2**53  # JSON-safe integers for every client
# Header forms (ASCII digits only: no "inf", "nan", "1e300", "0x10", "1_000" or non-ASCII digits)
DEADLINE_HEADER = r"^[0-9]{1,12}(\.[0-9]{1,6})?$"
PRIORITY_HEADER = r"^[+-]?[0-9]{1,4}$"
_DEADLINE_RE = re.compile(DEADLINE_HEADER)
_PRIORITY_RE = re.compile(PRIORITY_HEADER)
DECODE_FORMATS = ("png", "jpeg", "webp", "npy")
DECODE_FIELDS = ("shape", "dtype", "data", "model", "format")


# ---------------------------------------------------------------------------------------------- control fields
# Every numeric header and JSON control field is checked here, finite and in range, once.


def parse_deadline_ms(value: object, name: str = "deadline_ms", *, text: bool = False) -> float:
    """A deadline in milliseconds from now (``x-deadline-ms`` header ``text``, or a JSON number) -> seconds.
    Finite, > 0 and at most :data:`MAX_DEADLINE_MS`; anything else is 422."""
    if text and isinstance(value, str):
        if not _DEADLINE_RE.fullmatch(value):
            raise InvalidValue(f"{name} must be a decimal number of milliseconds, got {_short(value)}")
        ms = float(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        ms = float(value) if not isinstance(value, int) or abs(value) < 2**63 else math.inf
    else:
        raise InvalidValue(f"{name} must be a number of milliseconds, got {_short(value)}")
    if not (math.isfinite(ms) and 0 < ms <= MAX_DEADLINE_MS):
        raise InvalidValue(f"{name} must be in (0, {MAX_DEADLINE_MS}] milliseconds, got {_short(value)}")
    return ms / 1000.0


def parse_priority(value: object, name: str = "priority", *, text: bool = False) -> int:
    """``x-priority`` header ``text`` or a JSON integer -> an int in :data:`PRIORITY_RANGE` (422 otherwise)."""
    lo, hi = PRIORITY_RANGE
    if text and isinstance(value, str):
        if not _PRIORITY_RE.fullmatch(value):
            raise InvalidValue(f"{name} must be an integer in {lo}..{hi}, got {_short(value)}")
        p = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        p = value
    else:
        raise InvalidValue(f"{name} must be an integer in {lo}..{hi}, got {_short(value)}")
    if not lo <= p <= hi:
        raise InvalidValue(f"{name} must be in {lo}..{hi} (higher runs sooner), got {_short(p)}")
    return p


def optional_name(value: object, name: str) -> str | None:
    """A model name (or similar) from a JSON body: a string or null (422 for a list, object, number)."""
    if value is None or isinstance(value, str):
        return value
    raise InvalidValue(f"{name} must be a string, got {type(value).__name__}")


def decode_body(body: object) -> tuple[dict[str, Any], str | None, str | None]:
    """The JSON body of ``POST /v1/decode`` -> (the tensor fields, model, format). Unknown fields and a
    non-string model or format are 422 (the format's value is checked by :func:`valid_decode`)."""
    if not isinstance(body, dict):
        raise BadRequest('the JSON body must be a tensor object {"shape", "dtype", "data"}')
    extra = sorted(set(body) - set(DECODE_FIELDS))
    if extra:
        raise InvalidValue(f"unknown fields {_short(extra)}: a decode body has {list(DECODE_FIELDS)}")
    model = optional_name(body.get("model"), "model")
    fmt = optional_name(body.get("format"), "format")
    return {k: body[k] for k in ("shape", "dtype", "data") if k in body}, model, fmt


def _short(value: Any, n: int = 60) -> str:
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def parse_model(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InvalidValue(describe_validation(e.errors())) from None


def describe_classes(spec: ModelSpec) -> str:
    c = spec.classes
    if c == tuple(range(len(c))):
        return f"0..{len(c) - 1}"
    shown = ", ".join(map(str, c[:12]))
    return f"one of {len(c)} ids [{shown}{', ...' if len(c) > 12 else ''}] (see GET /v1/models)"


def seed_from_key(key: str) -> int:
    """The seed of a request that gives an Idempotency-Key but no seed: a retry must get the same one."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % MAX_SEED


def fingerprint(*parts: Any) -> str:
    """SHA-256 of ``parts`` (tensors by bytes and shape, bytes as they are, anything else by ``repr``): what
    an ``Idempotency-Key`` is bound to, so a key reused for another request is refused."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.contiguous().numpy().tobytes())
            h.update(str(tuple(p.shape)).encode())
        elif isinstance(p, bytes):
            h.update(p)
        else:
            h.update(repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()


class ValidRequest(Protocol):
    """What every ``Valid*`` request gives the queue: its model, its payload, its idempotency fingerprint."""

    @property
    def model(self) -> str: ...

    def payload(self) -> Payload: ...

    def fingerprint(self) -> str: ...


# ---------------------------------------------------------------------------------------------- encode


@dataclass(frozen=True, eq=False)
class ValidEncode:
    """An encode, admitted and decoded: ``images`` (B, 3, S, S) float32 in [-1, 1] at the tokenizer's size.
    ``source`` is what the client sent (the image files' bytes, or a (B, H, W, 3) uint8 pixel tensor), kept
    for the fingerprint only."""

    model: str
    images: torch.Tensor
    preprocess: str
    source: tuple[bytes | torch.Tensor, ...]

    def payload(self) -> EncodePayload:
        return EncodePayload(self.images)

    def fingerprint(self) -> str:
        return fingerprint("encode", self.model, self.preprocess, *self.source)


PREPROCESS_MODES = ("center-crop", "resize")


def encode_spec(state: AppState, model: str | None, preprocess: str | None) -> tuple[ModelSpec, str]:
    """(the tokenizer, the preprocessing mode) of an encode: 404 for an unknown model, 422 for a mode other
    than ``center-crop`` (the default) or ``resize``."""
    mode = preprocess or "center-crop"
    if mode not in PREPROCESS_MODES:
        raise InvalidValue(f"preprocess must be center-crop or resize, got {_short(mode)}")
    return state.models.tokenizer(model), mode


def json_images(body: EncodeJSONRequest, max_images: int) -> list[bytes]:
    """The image files of a JSON encode body (``image`` or ``images``, base64), counted before decoding."""
    if (body.image is None) == (body.images is None):
        raise InvalidValue('give exactly one of "image" (base64) or "images" (list of base64)')
    texts = [body.image] if body.image is not None else list(body.images or [])
    check_image_count(len(texts), max_images)
    return [decode_base64(t, f"images[{i}]") for i, t in enumerate(texts)]


def check_image_count(n: int, max_images: int) -> None:
    if not n:
        raise InvalidValue("no image in the request")
    if n > max_images:
        raise InvalidValue(f"{n} images; at most {max_images} per request")


async def valid_encode(state: AppState, blobs: list[bytes], model: str | None,
                       preprocess: str | None) -> ValidEncode:
    """Image files -> :class:`ValidEncode`: counted, admitted (413 / 429 from their headers, before any
    decoding), decoded and preprocessed in the codec pool."""
    spec, mode = encode_spec(state, model, preprocess)
    check_image_count(len(blobs), state.settings.max_images_per_request)
    images = await decode_images(state, spec.name, spec.image_size, blobs, mode)
    return ValidEncode(spec.name, images, mode, tuple(blobs))


async def valid_encode_pixels(state: AppState, pixels: np.ndarray, model: str | None,
                              preprocess: str | None) -> ValidEncode:
    """Decoded pixels (B, H, W, 3) uint8 (the Open Inference Protocol's ``IMAGE``) -> :class:`ValidEncode`:
    the same pixel limits (413) and admission (429) as image files, then the same preprocessing."""
    spec, mode = encode_spec(state, model, preprocess)
    check_image_count(len(pixels), state.settings.max_images_per_request)
    images = await preprocess_arrays(state, spec.name, spec.image_size, pixels, mode)
    return ValidEncode(spec.name, images, mode, (torch.from_numpy(pixels),))


async def valid_encode_json(state: AppState, body: object, model: str | None = None,
                            preprocess: str | None = None) -> ValidEncode:
    """A JSON encode body (:class:`server.schemas.EncodeJSONRequest`) -> :class:`ValidEncode`; ``model`` /
    ``preprocess`` given as query parameters win over the body's."""
    req: EncodeJSONRequest = parse_model(EncodeJSONRequest, body)
    blobs = json_images(req, state.settings.max_images_per_request)
    return await valid_encode(state, blobs, model or req.model, preprocess or req.preprocess)


# ---------------------------------------------------------------------------------------------- decode


@dataclass(frozen=True, eq=False)
class ValidDecode:
    """A decode, admitted and checked against its tokenizer: ``tokens`` (B, L, D) float32 latents, or int64
    codes (B, *code shape) in [0, codebook size) for a discrete tokenizer; ``format`` of the images."""

    model: str
    tokens: torch.Tensor
    format: str

    def payload(self) -> DecodePayload:
        return DecodePayload(self.tokens)

    def fingerprint(self) -> str:
        return fingerprint("decode", self.model, self.format, self.tokens)


async def valid_decode(state: AppState, kind: str, raw: Any, model: str | None, fmt: str | None) -> ValidDecode:
    """Tokens as ``kind`` (``json`` tensor fields, ``npy`` / ``safetensors`` bytes, or a parsed ``array``) ->
    :class:`ValidDecode`: admitted (429 when the queue is full), then parsed and checked in the codec pool."""
    spec = state.models.tokenizer(model)
    fmt = fmt or "png"
    if fmt not in DECODE_FORMATS:
        raise InvalidValue(f"format must be one of {list(DECODE_FORMATS)}, got {_short(fmt)}")
    tokens = await parse_tokens(state, spec, kind, raw)
    return ValidDecode(spec.name, tokens, fmt)


async def valid_decode_json(state: AppState, body: object, model: str | None = None, fmt: str | None = None,
                            fallback_fmt: str | None = None) -> ValidDecode:
    """A JSON decode body (:class:`server.schemas.DecodeJSONRequest`) -> :class:`ValidDecode`. ``model`` /
    ``fmt`` (the query's) win over the body's; ``fallback_fmt`` (from ``Accept``) applies when neither gives
    a format; then PNG."""
    tensor, body_model, body_fmt = decode_body(body)
    return await valid_decode(state, "json", tensor, model or body_model, fmt or body_fmt or fallback_fmt)


# ---------------------------------------------------------------------------------------------- generate


@dataclass(frozen=True)
class ValidGenerate:
    """A generation: ``num_images`` rows; row i uses ``seed + i`` and class ``class_id`` (or
    ``row_classes[i]`` when given: the Open Inference Protocol's one class per row). Every value is
    resolved (the generator's defaults filled in) and in range. ``format`` (the image format asked for) is
    a rendering choice: not part of the fingerprint, so it does not split an idempotent request."""

    model: str
    class_id: int
    seed: int
    num_images: int
    cfg_scale: float
    guidance_interval: tuple[float, float]
    steps: int
    sampler: str
    path_type: str
    return_latents: bool
    row_classes: tuple[int, ...] = field(default=())
    format: str | None = field(default=None, repr=False, compare=False)  # png / jpeg / webp; None: not asked


    def requests(self) -> list[SampleRequest]:
        """One row per image; image i uses ``seed + i``."""
        lo, hi = self.guidance_interval
        classes = self.row_classes or (self.class_id,) * self.num_images
        return [SampleRequest(class_id=c, seed=self.seed + i, steps=self.steps, cfg_scale=self.cfg_scale,
                              guidance_low=lo, guidance_high=hi, sampler=self.sampler, path_type=self.path_type)
                for i, c in enumerate(classes)]

    def payload(self) -> GeneratePayload:
        return GeneratePayload(self.requests(), return_latents=self.return_latents)

    def fingerprint(self) -> str:
        return fingerprint("generate", self.model, repr(self))

    def summary(self) -> dict[str, Any]:
        """The fields a generate response repeats (:class:`server.schemas.GenerateResponse` but images),
        JSON-ready: what :func:`server.render.generate_json` and a job's stored metadata take."""
        return {"model": self.model, "class": self.class_id, "seed": self.seed, "cfg_scale": self.cfg_scale,
                "guidance_interval": list(self.guidance_interval), "steps": self.steps, "sampler": self.sampler}


def validate_generate(p: GenerateParams, spec: ModelSpec, settings: Settings,
                      idempotency_key: str | None = None) -> ValidGenerate:
    d = spec.defaults
    if p.class_id is None:
        raise InvalidValue(f"class is required: an ImageNet-1k class id served by {spec.name} "
                           f"({describe_classes(spec)})")
    if p.class_id not in spec.classes:
        raise InvalidValue(f"class {p.class_id} is not served by {spec.name}: valid ids are "
                           f"{describe_classes(spec)}")
    if p.num_images > settings.max_images_per_request:
        raise InvalidValue(f"num_images {p.num_images} is over the limit of {settings.max_images_per_request}")
    sampler = p.sampler or d["sampler"]
    if sampler not in spec.samplers:
        raise InvalidValue(f"sampler {sampler!r} does not fit {spec.name} ({spec.family}): use one of "
                           f"{list(spec.samplers)}")
    steps = p.steps if p.steps is not None else int(d["steps"])
    if spec.fixed_steps and steps != int(d["steps"]):
        raise InvalidValue(f"{spec.name} ({spec.family}) always runs its {d['steps']} {spec.step_noun}, so steps "
                           f"must be {d['steps']} (or left out), got {steps}")
    if not 1 <= steps <= settings.max_steps:
        raise InvalidValue(f"steps must be in 1..{settings.max_steps}, got {steps}")
    if p.guidance_interval is not None and (p.guidance_low is not None or p.guidance_high is not None):
        raise InvalidValue("give guidance_interval or guidance_low / guidance_high, not both")
    lo, hi = p.guidance_interval or (
        p.guidance_low if p.guidance_low is not None else d["guidance_interval"][0],
        p.guidance_high if p.guidance_high is not None else d["guidance_interval"][1],
    )
    if not 0.0 <= lo <= hi <= 1.0:
        raise InvalidValue(f"guidance interval must satisfy 0 <= low <= high <= 1, got [{lo}, {hi}]")
    if p.seed is not None:
        seed = p.seed
    elif idempotency_key is not None:
        seed = seed_from_key(idempotency_key)
    else:
        seed = secrets.randbelow(MAX_SEED)
    cfg = p.cfg_scale if p.cfg_scale is not None else float(d["cfg_scale"])
    return ValidGenerate(model=spec.name, class_id=p.class_id, seed=seed, num_images=p.num_images, cfg_scale=cfg,
                         guidance_interval=(float(lo), float(hi)), steps=steps, sampler=sampler,
                         path_type=str(d["path_type"]), return_latents=p.return_latents, format=p.format)


def valid_generate(state: AppState, params: object, idempotency_key: str | None = None) -> ValidGenerate:
    """Generation parameters (:class:`server.schemas.GenerateParams`, or its fields as a JSON object) ->
    :class:`ValidGenerate`, against the generator they name (404 when unknown)."""
    p = params if isinstance(params, GenerateParams) else parse_model(GenerateParams, params)
    return validate_generate(p, state.models.generator(p.model), state.settings, idempotency_key)


def merge_generate(query: GenerateQuery, body: object | None) -> GenerateParams:
    """The query's parameters overridden field by field by a JSON body's (``class`` in the body replaces
    ``class_id`` in the query: fields, not spellings, are merged)."""
    given = query.model_dump(exclude_unset=True)
    if body is not None:
        if not isinstance(body, dict):
            raise BadRequest("the JSON body must be an object of parameters")
        given.update(parse_model(GenerateParams, body).model_dump(exclude_unset=True))
    return GenerateParams.model_validate(given)
