"""Turn raw request parameters into ``Valid*`` values once, at the edge; the queue and the engine trust them.

Every problem raises :class:`server.errors.InvalidValue` (422) that names the parameter and the valid range.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from models.sampling.base import SampleRequest
from server.engine.specs import ModelSpec
from server.errors import InvalidValue
from server.handlers import describe_validation
from server.schemas import GenerateParams
from server.settings import Settings

MAX_SEED = 2**53  # JSON-safe integers for every client


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
