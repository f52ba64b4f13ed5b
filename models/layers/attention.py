"""The one attention kernel of every tokserve model, and the process-wide switch that picks its form.

``attend(q, k, v)`` computes ``softmax(q k^T * scale + mask) v`` over (B, H, N, hd) tensors in one of two forms:

* ``sdpa`` (the default): ``F.scaled_dot_product_attention``, fused and faster; in fp32 on the CPU it differs
  from the explicit form by reordering noise (about 1e-6 per block, ~4e-6 on SoftVQ encoder tokens).
* ``exact``: the explicit ``softmax((q * scale) @ k^T) @ v`` the official SoftVQ / SiT / DiT code runs (timm's
  ``Attention`` with ``fused_attn = False``, FORMATS.md 2.1), so fp32 outputs on the CPU are bit-identical to
  the reference implementation.

The mode is process-wide (set by the server from ``TOKSERVE_ATTENTION`` at start-up, or temporarily with
:func:`attention_mode`); a module whose own ``fused`` flag is off (exporters) always runs the explicit form.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F

AttentionMode = Literal["sdpa", "exact"]
ATTENTION_MODES: tuple[AttentionMode, ...] = ("sdpa", "exact")
_mode: AttentionMode = "sdpa"


def get_attention_mode() -> AttentionMode:
    return _mode


def set_attention_mode(mode: AttentionMode) -> None:
    """Select ``sdpa`` or ``exact`` for every model of this process (all threads)."""
    global _mode
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
    _mode = mode


@contextlib.contextmanager
def attention_mode(mode: AttentionMode) -> Iterator[None]:
    """``with attention_mode("exact"): ...``: the mode for the block, restored afterwards."""
    old = _mode
    set_attention_mode(mode)
    try:
        yield
    finally:
        set_attention_mode(old)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           scale: float | None = None, fused: bool = True) -> torch.Tensor:
    """q (B, H, Nq, hd), k (B, H, Nk, hd), v (B, H, Nk, hv) -> (B, H, Nq, hv).

    ``mask``: additive float bias or boolean keep-mask broadcastable to (B, H, Nq, Nk); ``scale`` defaults to
    ``hd ** -0.5``. ``fused=False`` forces the explicit form whatever the process mode."""
    if fused and _mode == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q * s) @ k.transpose(-2, -1)
    if mask is not None:
        attn = attn.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else attn + mask
    return attn.softmax(dim=-1) @ v
