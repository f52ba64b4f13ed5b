"""Classifier-free guidance packing shared by every step sampler.

One model forward evaluates all rows conditionally and, appended after them, an unconditional copy
(label = null class) of only the rows whose guidance is on. The batch is never duplicated as a whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.sampling.base import ModelFn, StepStats, to_device


def call_model(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``model_fn(x, t, y)``; a ``(out, extra)`` tuple (the official SiT returns one) gives ``out``."""
    out = model_fn(x, t, y)
    return out[0] if isinstance(out, tuple | list) else out


def guidance_active(cfg_scale: float, low: float, high: float, t: float) -> bool:
    """The official rule: guide when ``cfg_scale > 1`` and ``low <= t <= high`` (t compared in float64)."""
    return cfg_scale > 1.0 and low <= t <= high


@dataclass
class GuidedOutput:
    """``cond`` (N, L, C_out) for every row; ``uncond`` (G, L, C_out) for the rows ``index`` (G,)."""

    cond: torch.Tensor
    uncond: torch.Tensor
    index: torch.Tensor

    def combine(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Guide ``a`` (N, ...) with unconditional ``b`` (G, ...) on the guided rows:
        ``b + s * (a - b)``; other rows keep ``a``. ``scale`` (N,) per-row guidance scales. ``inplace``: ``a``
        is the caller's own buffer and may hold the result (the same operations, so the same values)."""
        if self.index.numel() == 0:
            return a
        if self.index.numel() == a.shape[0]:  # every row guided: index is 0 .. N-1, no gather or scatter
            s = scale.to(a.dtype).view(-1, *([1] * (a.dim() - 1)))
            return a.sub_(b).mul_(s).add_(b) if inplace else b + s * (a - b)
        out = a if inplace else a.clone()
        s = scale[self.index].to(a.dtype).view(-1, *([1] * (a.dim() - 1)))
        ca = a[self.index]
        out[self.index] = b + s * (ca - b)
        return out


def guided_forward(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                   guided: Sequence[bool], null_class: int, stats: StepStats | None = None) -> GuidedOutput:
    """One forward of ``[x; x[guided]]`` with labels ``[y; null]``.

    x (N, L, C) in the model dtype, t (N,) float32, y (N,) int64, ``guided`` N flags (host booleans: the
    batch's shape is decided without reading the device). Updates ``stats``.
    """
    n = x.shape[0]
    rows = [i for i, g in enumerate(guided) if g]
    index = to_device(rows, torch.long, x.device)
    if rows and len(rows) == n:  # all guided: the copies are the whole batch
        xin, tin = torch.cat([x, x]), torch.cat([t, t])
        yin = torch.cat([y, torch.full((n,), null_class, dtype=y.dtype, device=y.device)])
    elif rows:
        xin = torch.cat([x, x[index]])
        tin = torch.cat([t, t[index]])
        yin = torch.cat([y, torch.full((index.numel(),), null_class, dtype=y.dtype, device=y.device)])
    else:
        xin, tin, yin = x, t, y
    out = call_model(model_fn, xin, tin, yin)
    if stats is not None:
        stats.forwards += 1
        stats.model_rows += xin.shape[0]
        stats.uncond_rows += index.numel()
    return GuidedOutput(out[:n], out[n:], index)


def append_unconditional(guided: Sequence[int], null_class: int, labels: torch.Tensor,
                         *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``([labels; null], [x; x[guided]] for x in inputs)``: the batch of a guided forward whose model
    takes labels and per-row inputs but no time (MAR's transformer, MaskGIT). ``guided``: row indices."""
    if not guided:
        return (labels, *inputs)
    gi = torch.tensor(list(guided), dtype=torch.long, device=labels.device)
    null = torch.full((len(guided),), null_class, dtype=labels.dtype, device=labels.device)
    return (torch.cat([labels, null]), *(torch.cat([x, x[gi]]) for x in inputs))


def plan_step(rows: Sequence[Any], plan: Callable[[Any], Any]) -> tuple[list[Any], list[int]]:
    """The prologue of an iterative sampler's step: refuse finished rows, plan each row's iteration
    (``plan(row)`` returns an object with a ``guided`` flag), and list the guided rows' indices."""
    if any(r.done for r in rows):
        raise ValueError("step() got a finished row")
    plans = [plan(r) for r in rows]
    return plans, [i for i, p in enumerate(plans) if p.guided]
