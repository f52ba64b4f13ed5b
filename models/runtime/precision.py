"""Numeric precision of the PyTorch runners, and the module preparation it needs.

Precision modes (:attr:`RunnerConfig.precision <models.runtime.config.RunnerConfig>`):

* ``fp32``: float32 weights and math, TF32 off (the official evaluation setting);
* ``tf32``: float32 weights, TF32 tensor-core matmuls and convolutions allowed;
* ``bf16-autocast``: float32 weights, the call under ``torch.autocast(bfloat16)``;
* ``bf16`` / ``fp16``: weights cast. The submodules named in ``keep_fp32`` (default: the SiT/DiT time
  embedder and the soft quantizer, both tiny) stay float32: their floating inputs are cast up and their
  outputs back down, so a diffusion time keeps its float32 resolution (bf16 has 8 bits of mantissa: 250
  time steps near t = 1 would collapse) and the 8192-way soft assignment keeps its float32 softmax.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from models.dit import Attention as DiTAttention
from models.dit import TimestepEmbedder
from models.layers.vit import Attention as ViTAttention

PRECISIONS = ("fp32", "tf32", "bf16-autocast", "bf16", "fp16")
# Submodules kept in float32 when the weights are cast (those present in a module are used).
DEFAULT_KEEP_FP32 = ("t_embedder", "quantize")
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# TOKSERVE_DTYPE values -> precision modes
PRECISION_OF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device | str) -> Iterator[None]:
    """The numeric context of a call: TF32 off for ``fp32``, on for ``tf32`` (restored after), autocast
    (cache off, as CUDA graph capture needs) for ``bf16-autocast``, nothing for cast weights."""
    dev = torch.device(device)
    if precision in ("fp32", "tf32"):
        on = precision == "tf32"
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    elif precision == "bf16-autocast":
        with torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=False):
            yield
    else:
        yield


def set_fused_attention(module: nn.Module, fused: bool) -> None:
    """SDPA (``True``, the default) or the explicit softmax attention in every ViT / DiT attention."""
    for m in module.modules():
        if isinstance(m, ViTAttention | DiTAttention):
            m.fused = fused


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple):
        return tuple(_cast_floats(o, dtype) for o in obj)
    return obj


def cast_module(module: nn.Module, dtype: torch.dtype, keep_fp32: Sequence[str] = DEFAULT_KEEP_FP32) -> nn.Module:
    """Cast ``module`` to ``dtype`` in place, except the named submodules present (float32, with hooks
    casting floating inputs up to float32 and a tensor output back to ``dtype``). Returns ``module``.
    Idempotent: a submodule gets its hooks once."""
    module.to(dtype)
    if dtype == torch.float32:
        return module
    for name in keep_fp32:
        try:
            sub = module.get_submodule(name)
        except AttributeError:
            continue
        sub.float()
        if getattr(sub, "_tokserve_fp32_hooks", None) is not None:
            sub._tokserve_fp32_hooks[0] = dtype  # type: ignore[index]
            continue
        out_dtype = [dtype]
        sub._tokserve_fp32_hooks = out_dtype  # type: ignore[assignment]
        sub.register_forward_pre_hook(lambda _m, args: _cast_floats(args, torch.float32))
        sub.register_forward_hook(lambda _m, _args, out, dt=out_dtype: out.to(dt[0]) if isinstance(out, torch.Tensor)
                                  and out.is_floating_point() else out)
    return module


class CachedTimestepEmbedder(nn.Module):
    """A :class:`~models.dit.TimestepEmbedder` whose sinusoid frequencies live on the device.

    The original builds them on the CPU and copies them to ``t.device`` at every call, a host-to-device copy
    that CUDA graph capture forbids. Here they are built once exactly as there (float32, on the CPU) and kept
    as a non-persistent buffer, so the numbers are the same and the state-dict keys (``mlp.0``, ``mlp.2``)
    are unchanged. t (N,) -> (N, D).
    """

    def __init__(self, orig: TimestepEmbedder, max_period: float = 10000.0) -> None:
        super().__init__()
        self.mlp = orig.mlp
        self.frequency_size = orig.frequency_size
        self.cast_to_input_dtype = orig.cast_to_input_dtype
        half = orig.frequency_size // 2
        self._exact = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
        self.register_buffer("freqs", self._exact.to(orig.mlp[0].weight.device), persistent=False)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> CachedTimestepEmbedder:
        # Moves follow the module; a dtype cast of the whole model must not round the frequencies.
        super()._apply(fn, recurse)
        if self.freqs.dtype != torch.float32:
            self.freqs = self._exact.to(self.freqs.device)
        return self

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t[:, None].float() * self.freqs[None]
        f = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_size % 2:
            f = torch.cat([f, torch.zeros_like(f[:, :1])], dim=-1)
        if self.cast_to_input_dtype:
            f = f.to(t.dtype)
        return self.mlp(f.to(self.mlp[0].weight.dtype))


def make_graph_safe(module: nn.Module) -> nn.Module:
    """Swap every :class:`TimestepEmbedder` under ``module`` for a :class:`CachedTimestepEmbedder`."""
    for name, sub in list(module.named_modules()):
        if isinstance(sub, TimestepEmbedder):
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(parent, name.rpartition(".")[2], CachedTimestepEmbedder(sub))
    return module


__all__ = ["DEFAULT_KEEP_FP32", "PRECISIONS", "PRECISION_OF_DTYPE", "WEIGHT_DTYPES", "CachedTimestepEmbedder",
           "cast_module", "make_graph_safe", "precision_context", "set_fused_attention"]
