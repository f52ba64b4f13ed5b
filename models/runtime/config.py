"""How a PyTorch runner runs: :class:`RunnerConfig`, written as a variant string such as ``bf16+compile+graphs``.

Grammar: a precision (``fp32``, ``tf32``, ``bf16-autocast``, ``bf16``, ``fp16``; see
:mod:`models.runtime.precision`) then flags: ``compile`` (``torch.compile``), ``dyn`` (one dynamic-shape
compile for every batch size), ``autotune`` (mode max-autotune-no-cudagraphs), ``graphs`` (CUDA graphs, one
per bucket), ``cl`` (channels-last convolutions), ``math`` (explicit attention instead of SDPA).

A runner with graphs, or with a static-shape compile, runs every call as bucket-padded chunks
(:mod:`models.runtime.buckets`); otherwise calls go straight through (``buckets`` is None).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from models.runtime.buckets import DEFAULT_BUCKETS, normalize_buckets
from models.runtime.precision import DEFAULT_KEEP_FP32, PRECISION_OF_DTYPE, PRECISIONS, WEIGHT_DTYPES

FLAGS = ("compile", "dyn", "autotune", "graphs", "cl", "math")


@dataclass(frozen=True)
class RunnerConfig:
    """``compile_mode`` is passed to ``torch.compile`` (None = its default); with ``cuda_graphs`` on, use a mode
    without inductor's own graphs (``default``, ``max-autotune-no-cudagraphs``). ``buckets`` defaults to
    :data:`DEFAULT_BUCKETS` where graphs or a static compile need them, else None (no padding)."""

    precision: str = "fp32"
    compile: bool = False
    compile_mode: str | None = None
    compile_dynamic: bool = False
    cuda_graphs: bool = False
    buckets: tuple[int, ...] | None = None
    channels_last: bool = False
    fused_attention: bool = True
    keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.buckets is None and (self.cuda_graphs or (self.compile and not self.compile_dynamic)):
            object.__setattr__(self, "buckets", DEFAULT_BUCKETS)
        if self.buckets is not None:
            object.__setattr__(self, "buckets", normalize_buckets(self.buckets))
        if self.compile and self.cuda_graphs and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile mode {self.compile_mode!r} captures its own CUDA graphs; with cuda_graphs "
                             "use 'default' or 'max-autotune-no-cudagraphs'")

    @classmethod
    def parse(cls, spec: str, **overrides: Any) -> RunnerConfig:
        """``"bf16+compile+graphs"`` -> a config (see the module docstring). Graphs are off unless named."""
        precision, *flags = spec.strip().split("+")
        unknown = sorted(set(flags) - set(FLAGS))
        if unknown:
            raise ValueError(f"unknown runner flags {unknown} in {spec!r}; known: {sorted(FLAGS)}")
        kw: dict[str, Any] = {
            "precision": precision,
            "compile": "compile" in flags or "dyn" in flags or "autotune" in flags,
            "compile_dynamic": "dyn" in flags,
            "compile_mode": "max-autotune-no-cudagraphs" if "autotune" in flags else None,
            "cuda_graphs": "graphs" in flags,
            "channels_last": "cl" in flags,
            "fused_attention": "math" not in flags,
        }
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def for_dtype(cls, dtype: str | torch.dtype, **changes: Any) -> RunnerConfig:
        """The config of a ``TOKSERVE_DTYPE`` value (``float32`` -> fp32, ``bfloat16`` -> bf16 cast weights,
        ``float16`` -> fp16), with ``changes`` (``compile=True`` ...)."""
        name = str(dtype).removeprefix("torch.")
        if name not in PRECISION_OF_DTYPE:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(PRECISION_OF_DTYPE)}")
        return cls(precision=PRECISION_OF_DTYPE[name], **changes)

    @property
    def label(self) -> str:
        """The inverse of :meth:`parse` (flags in a fixed order)."""
        flags = [self.precision]
        if self.compile:
            flags.append("dyn" if self.compile_dynamic else "compile")
            if self.compile_mode == "max-autotune-no-cudagraphs":
                flags.append("autotune")
        flags += [name for name, on in (("graphs", self.cuda_graphs), ("cl", self.channels_last),
                                        ("math", not self.fused_attention)) if on]
        return "+".join(flags)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the weights and of the image / token tensors handed to the module (float32 under
        autocast)."""
        return WEIGHT_DTYPES.get(self.precision, torch.float32)

    def with_changes(self, **changes: Any) -> RunnerConfig:
        return replace(self, **changes)


__all__ = ["FLAGS", "RunnerConfig"]
