"""Turn raw request parameters into ``Valid*`` values once, at the edge; the queue and the engine trust them.

Every problem raises :class:`server.errors.InvalidValue` (422) that names the parameter and the valid range.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from models.sampling.base import SampleRequest
from server.engine.specs import ModelSpec
from server.errors import BadRequest, InvalidValue
from server.handlers import describe_validation
from server.queue.base import PRIORITY_RANGE
from server.schemas import GenerateParams
from server.settings import Settings

MAX_SEED = 2**53  # JSON-safe integers for every client
MAX_DEADLINE_MS = 24 * 3600 * 1000  # x-deadline-ms / deadline_ms: at most a day
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
    """The JSON body of ``POST /v1/decode`` -> (the tensor fields, model, format). Unknown fields, a
    non-string model and an unknown format are 422."""
    if not isinstance(body, dict):
        raise BadRequest('the JSON body must be a tensor object {"shape", "dtype", "data"}')
    extra = sorted(set(body) - set(DECODE_FIELDS))
    if extra:
        raise InvalidValue(f"unknown fields {_short(extra)}: a decode body has {list(DECODE_FIELDS)}")
    model = optional_name(body.get("model"), "model")
    fmt = optional_name(body.get("format"), "format")
    if fmt is not None and fmt not in DECODE_FORMATS:
        raise InvalidValue(f"format must be one of {list(DECODE_FORMATS)}, got {_short(fmt)}")
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


@dataclass(frozen=True)
class ValidGenerate:
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

    def requests(self) -> list[SampleRequest]:
        """One row per image; image i uses ``seed + i``."""
        lo, hi = self.guidance_interval
        return [SampleRequest(class_id=self.class_id, seed=self.seed + i, steps=self.steps, cfg_scale=self.cfg_scale,
                              guidance_low=lo, guidance_high=hi, sampler=self.sampler, path_type=self.path_type)
                for i in range(self.num_images)]

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()


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
    if spec.family == "var" and steps != int(d["steps"]):
        raise InvalidValue(f"{spec.name} is a VAR generator: it runs its {d['steps']} scales, so steps must be "
                           f"{d['steps']} (or left out), got {steps}")
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
                         path_type=str(d["path_type"]), return_latents=p.return_latents)
