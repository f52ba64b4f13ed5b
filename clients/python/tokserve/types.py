"""Result records returned by the SDK."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["DecodeResult", "GenerateResult", "Latents", "ModelInfo", "ModelList", "Timings"]


@dataclass(frozen=True)
class Timings:
    """Server-side timings of one response, in milliseconds (``None`` when a header was absent).

    ``queue_ms`` is the time the request waited for a batch (``x-queue-time``), ``compute_ms`` the time the
    model ran (``x-compute-time``), ``total_ms`` the server's end-to-end time (``x-total-time``).
    """

    queue_ms: float | None = None
    compute_ms: float | None = None
    total_ms: float | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Timings:
        """Read ``x-queue-time``, ``x-compute-time`` and ``x-total-time`` (case-insensitive)."""
        lowered = {k.lower(): v for k, v in headers.items()}
        return cls(
            queue_ms=_float_or_none(lowered.get("x-queue-time")),
            compute_ms=_float_or_none(lowered.get("x-compute-time")),
            total_ms=_float_or_none(lowered.get("x-total-time")),
        )


@dataclass(frozen=True)
class Latents:
    """Latent tokens from ``encode``.

    Attributes:
        array: ``(B, L, D)`` float32 tokens, or integer codes for a discrete tokenizer.
        model: the tokenizer that produced them (``None`` if the server did not say and none was requested).
        timings: server timings of the request.
        request_id: the server's request id.
    """

    array: np.ndarray
    model: str | None = None
    timings: Timings = field(default_factory=Timings)
    request_id: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :attr:`array`, ``(B, L, D)``."""
        return tuple(self.array.shape)

    def __len__(self) -> int:
        return int(self.array.shape[0])


@dataclass(frozen=True)
class DecodeResult:
    """Images from ``decode_result`` with the response metadata (``decode`` returns just the images)."""

    images: list[Image.Image]
    model: str | None = None
    timings: Timings = field(default_factory=Timings)
    request_id: str | None = None


@dataclass(frozen=True)
class GenerateResult:
    """Images from ``generate``.

    Attributes:
        images: the generated images; image ``i`` was drawn with seed ``seeds[i]``.
        seed: the base seed (image ``i`` uses ``seed + i``).
        seeds: per-image seeds.
        latents: ``(B, L, D)`` latents when ``return_latents=True``, else ``None``.
        model, class_id, cfg_scale, guidance_interval, steps, sampler: the parameters the server used.
        timings: server timings; request_id: the server's request id.
    """

    images: list[Image.Image]
    seed: int | None
    seeds: list[int] = field(default_factory=list)
    latents: np.ndarray | None = None
    model: str | None = None
    class_id: int | None = None
    cfg_scale: float | None = None
    guidance_interval: tuple[float, float] | None = None
    steps: int | None = None
    sampler: str | None = None
    timings: Timings = field(default_factory=Timings)
    request_id: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """One served model, from ``GET /v1/models``; ``raw`` keeps every field the server sent."""

    name: str
    kind: str
    family: str | None = None
    image_size: int | None = None
    token_shape: tuple[int, ...] | None = None
    token_dtype: str | None = None
    code_structure: dict[str, Any] | None = None  # discrete tokenizers: branches, scales, codebook_size, layout
    tokenizer: str | None = None
    classes: list[int] | None = None
    num_classes: int | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    runtime: Any = None
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelInfo:
        shape = data.get("token_shape")
        return cls(
            name=str(data["name"]),
            kind=str(data.get("kind", "")),
            family=data.get("family"),
            image_size=data.get("image_size"),
            token_shape=tuple(int(s) for s in shape) if shape is not None else None,
            token_dtype=data.get("token_dtype"),
            code_structure=dict(data["code_structure"]) if data.get("code_structure") else None,
            tokenizer=data.get("tokenizer"),
            classes=list(data["classes"]) if data.get("classes") is not None else None,
            num_classes=data.get("num_classes"),
            defaults=dict(data.get("defaults") or {}),
            runtime=data.get("runtime"),
            raw=dict(data),
        )


@dataclass(frozen=True)
class ModelList:
    """``GET /v1/models``: the served models and the defaults."""

    models: list[ModelInfo]
    default_tokenizer: str | None = None
    default_generator: str | None = None

    def get(self, name: str) -> ModelInfo:
        """The model called ``name``; raises ``KeyError`` if it is not served."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"model {name!r} is not served; served: {[m.name for m in self.models]}")

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


def _float_or_none(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None
