"""The step-function contract shared by every sampler and by the server's scheduler.

A generation is a set of independent *rows* (one image each). A sampler turns a :class:`SampleRequest`
into a :class:`Row` (noise drawn from the row's own ``torch.Generator``) and advances any list of rows by
one step of each row's own schedule with ``step(model_fn, rows)``: one batched model forward per model
evaluation (conditional rows, plus unconditional copies only for rows that are inside their guidance
interval with ``cfg_scale > 1``). Because all randomness is per row and rows never read each other, a row's
result does not depend on which other rows share its batch (up to float round-off of batched matmuls).

The server keeps one running batch per (model, sampler name): new rows join at any step boundary, finished
rows (``row.done``) leave. ``model_fn`` is any callable with the generator's forward signature, so runtimes
(eager, compiled, ONNX) plug in without the sampler knowing.

Device residency: a sampler built with ``device=`` keeps each row's ``x`` and its ``torch.Generator`` on that
device and calls ``model_fn`` with tensors there; ``step`` never copies row state to the host. What the host
decides per step (which rows are guided, which take their last step) depends only on the requests and the
rows' step counters, never on tensor values, so it needs no device sync; the per-step numbers built from it
(times, scales, labels) go the other way, host to device, in one small copy (:func:`to_device`). A finished
row's ``result`` is still on the device: its consumer copies it back once. Seeds: a generator on CPU and one
on CUDA give different streams for the same seed, so a row's noise (and its image) depends on the sampler's
device: the same seed on the same device gives the same result, on another device another (valid) sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

# model_fn(x (N, L, C) float32, t (N,) float32, y (N,) int64) -> (N, L, C_out) float32, all on the sampler's
# device (a runtime that computes elsewhere moves them there and back itself)
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def to_device(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``: per-step numbers built on the host (times, scales,
    labels, row indices; nested lists give (K, N)). On the CPU no copy; on CUDA through pinned memory with a
    non-blocking copy, so the host never waits for the device's queued work (a pageable copy would)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class SampleRequest:
    """What one row (one image) asks for. ``class_id`` is an ImageNet-1k id (the null class is the
    generator's ``num_classes``). Guidance is applied when ``cfg_scale > 1`` and the row's current time lies
    in ``[guidance_low, guidance_high]`` (SiT time: 1 = noise, 0 = data; DiT: t / num_train_timesteps)."""

    class_id: int
    seed: int
    steps: int
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    sampler: str = "sde"
    path_type: str = "linear"


@dataclass
class Row:
    """The state of one row. ``x`` is (L, C) float64 in normalised latent space, on the sampler's device, as
    is ``generator``. ``step`` counts completed steps out of ``total``. ``state`` holds sampler-private values
    (timesteps, Heun stage ...)."""

    request: SampleRequest
    x: torch.Tensor
    generator: torch.Generator
    total: int
    step: int = 0
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.step >= self.total


@dataclass
class StepStats:
    """What one ``step`` call cost: rows advanced, model rows evaluated (cond + uncond), forwards run."""

    rows: int = 0
    model_rows: int = 0
    uncond_rows: int = 0
    forwards: int = 0


class StepSampler(Protocol):
    name: str

    def init_row(self, request: SampleRequest, shape: tuple[int, int]) -> Row: ...

    def step(self, model_fn: ModelFn, rows: Sequence[Row]) -> StepStats: ...

    def result(self, row: Row) -> torch.Tensor:
        """(L, C) float64 normalised latents of a finished row, on the sampler's device."""
        ...


def run_to_completion(sampler: StepSampler, model_fn: ModelFn, requests: Sequence[SampleRequest],
                      shape: tuple[int, int]) -> torch.Tensor:
    """Sample ``requests`` together from start to end; returns (B, L, C) float64 normalised latents."""
    rows = [sampler.init_row(r, shape) for r in requests]
    while not all(r.done for r in rows):
        sampler.step(model_fn, [r for r in rows if not r.done])
    return torch.stack([sampler.result(r) for r in rows])
