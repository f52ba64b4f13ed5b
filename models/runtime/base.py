"""What every model runner is: the :class:`ModelRunner` protocol and the records runners share.

A runner is one callable part of a model (a tokenizer's encoder or decoder, a generator's denoiser step) on
one device, whatever runs it (eager PyTorch, ``torch.compile``, CUDA graphs, TorchScript, ONNX Runtime)::

    out = runner(*tensors)      # tensors on (or movable to) runner.device -> float32 (int64 codes) on runner.device
    runner.warmup()             # first-call costs (compilation, graph capture, ONNX session) paid here
    runner.ready                # True once warmed up; the server's /readyz waits for it

Inputs are cast to what the part declares (its :class:`InputSpec` dtypes: the compute dtype for image and
token tensors, float32 for a diffusion time, int64 for classes and codes); floating outputs come back as
float32, so callers never see the compute dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


class RuntimeUnavailable(RuntimeError):
    """The runner cannot run here (no C++ compiler for torch.compile, no onnxruntime, missing export file ...)."""


@dataclass(frozen=True)
class InputSpec:
    """One batched argument of a runner: per-row shape (without the batch axis), dtype it is cast to, value of
    the padding rows of a bucket, and whether a 4-D buffer is kept channels-last."""

    row_shape: tuple[int, ...]
    dtype: torch.dtype
    pad_value: float | int = 0
    channels_last: bool = False


@dataclass
class RunnerStats:
    """Counters: calls, real rows, padding rows, chunks run by graph replay and eagerly."""

    calls: int = 0
    rows: int = 0
    padded_rows: int = 0
    replays: int = 0
    eager_runs: int = 0


@dataclass
class WarmupReport:
    """What ``warmup`` did: per-bucket seconds (one entry, key 0, for an unbucketed runner), graphs or eager."""

    name: str
    mode: str
    buckets: tuple[int, ...]
    seconds: dict[int, float] = field(default_factory=dict)
    total_s: float = 0.0
    finished_at: float = 0.0
    compile: str = "eager"


@runtime_checkable
class ModelRunner(Protocol):
    """One model part on one device. ``name`` says what runs it (``torch-eager``, ``torch-bf16+compile+graphs``,
    ``onnx[CPU]``, ``torchscript``); ``dtype`` is the compute dtype (float32 for exported graphs)."""

    name: str
    device: torch.device
    dtype: torch.dtype

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor: ...

    def warmup(self, buckets: Sequence[int] | None = None) -> WarmupReport: ...

    @property
    def ready(self) -> bool: ...


def cast_inputs(name: str, tensors: Sequence[torch.Tensor], specs: Sequence[InputSpec] | None,
                device: torch.device, float_dtype: torch.dtype) -> list[torch.Tensor]:
    """``tensors`` on ``device``, each cast to its spec's dtype (without specs: floating tensors to
    ``float_dtype``, others unchanged). ``TypeError`` when the count differs from the specs'."""
    if specs is not None and len(tensors) != len(specs):
        raise TypeError(f"{name} takes {len(specs)} tensors, got {len(tensors)}")
    out = []
    for i, x in enumerate(tensors):
        x = torch.as_tensor(x)
        if specs is not None:
            dtype = specs[i].dtype
        else:
            dtype = float_dtype if x.is_floating_point() else x.dtype
        out.append(x.to(device=device, dtype=dtype, non_blocking=True))
    return out


def float_output(out: torch.Tensor) -> torch.Tensor:
    """Floating outputs as float32 (no copy when already), integer codes unchanged."""
    return out.float() if out.is_floating_point() else out


__all__ = ["InputSpec", "ModelRunner", "RunnerStats", "RuntimeUnavailable", "WarmupReport", "cast_inputs",
           "float_output"]
