"""``auto``: the fastest correct runner for a model part on a device.

* **CUDA**: PyTorch with bf16 weights (or the explicit ``TOKSERVE_DTYPE``), ``torch.compile`` where it can run
  (triton) and CUDA graphs over the bucketed batch sizes (``bf16+compile+graphs``).
* **CPU**: eager PyTorch, or ONNX Runtime for the batch sizes where :data:`CPU_TABLE` records it faster for
  that model. ONNX Runtime runs the float32 graph, so a reduced ``TOKSERVE_DTYPE`` keeps PyTorch, as does
  ``exact`` (exact attention asks for PyTorch's explicit-softmax reference). ONNX Runtime on the CPU is also
  batch-invariant (:func:`batch_invariant_runner`), so the server needs no per-row calls for those parts. Models the
  table does not cover run eager: choosing ONNX costs an export (with its parity check) at start-up, worth
  paying only where a measurement showed the gain.

The table is a record of ``python -m export.bench`` runs (2 CPU threads), not a guess: each entry names the
model it was measured on and applies to models of the same class within a factor of two of its parameter
count. Re-measure on the deployment machine and add an entry (or set ``TOKSERVE_RUNTIME`` per model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from models.runtime.config import RunnerConfig
from models.runtime.torch_runner import torch_compile_available


@dataclass(frozen=True)
class CpuRecord:
    """ONNX Runtime measured faster than eager PyTorch on the CPU for ``part`` of ``model_class`` (about
    ``params`` parameters) at batch sizes ``onnx_from <= n < onnx_below`` (None: no upper end)."""

    model_class: str
    part: str
    params: int
    onnx_from: int = 1
    onnx_below: int | None = None
    source: str = ""

    def covers(self, module: nn.Module, part: str) -> bool:
        n = sum(p.numel() for p in module.parameters())
        return type(module).__name__ == self.model_class and part == self.part and self.params / 2 <= n <= 2 * self.params


_BENCH = ("python -m export.bench --models weights/default/tokenizer,weights/default/generator "
          "(docs/results/export-bench-defaults.txt)")
CPU_TABLE: tuple[CpuRecord, ...] = (
    # The shipped TAEF2 tokenizer (weights/default/tokenizer): encode 12.8 vs 5.8 img/s at batch 1, 20.6 vs
    # 8.0 at batch 32; issue #17 re-measured encode at ~100 vs 42-50 img/s, docs/results/export-bench-auto-cpu.txt
    # 47.6 vs 21.0 at 32. Decode 11.9 vs 4.1 and 17.4 vs 9.7 (there: 24.8 vs 17.8 and 37.2 vs 15.0).
    CpuRecord("TAEF2", "encoder", 2_677_027, source=_BENCH),
    CpuRecord("TAEF2", "decoder", 2_677_027, source=_BENCH),
    # The shipped SiT generator (weights/default/generator, 5.3 M): a denoiser step 31 vs 1.9 /s at batch 1,
    # 54 vs 27 at batch 32; later reruns found no gain at batch 32 (README "Runtimes on the shipped defaults"),
    # docs/results/export-bench-auto-cpu.txt 109 vs 92 (under load): at worst a tie at 32, so ONNX Runtime at
    # every batch size, which also keeps a row's result independent of its batch-mates (see
    # :func:`batch_invariant_runner`; a switch to PyTorch at 32 rows would not).
    CpuRecord("SiT", "denoiser", 5_286_432, source=_BENCH),
)


@dataclass(frozen=True)
class AutoPlan:
    """What ``auto`` chose: the PyTorch config, and the batch range ``[onnx_from, onnx_below)`` to run on ONNX
    Runtime instead (None: PyTorch only); ``reason`` for the log."""

    config: RunnerConfig
    onnx: tuple[int, int | None] | None = None
    reason: str = ""

    @property
    def onnx_everywhere(self) -> bool:
        return self.onnx is not None and self.onnx[0] <= 1 and self.onnx[1] is None


def auto_dtype(device: torch.device | str) -> str:
    """``TOKSERVE_DTYPE=auto``: bfloat16 on CUDA, float32 elsewhere."""
    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def auto_plan(module: nn.Module, part: str, device: torch.device | str, *, dtype: str = "auto",
              exact: bool = False, table: tuple[CpuRecord, ...] = CPU_TABLE) -> AutoPlan:
    """The ``auto`` choice for ``part`` of ``module`` on ``device`` (see the module docstring)."""
    dev = torch.device(device)
    dtype = auto_dtype(dev) if dtype == "auto" else dtype
    if dev.type == "cuda":
        compile_ok = torch_compile_available(dev)
        cfg = RunnerConfig.for_dtype(dtype, compile=compile_ok, cuda_graphs=True)
        return AutoPlan(cfg, reason=f"CUDA: {cfg.label}" + ("" if compile_ok else " (no triton: no compile)"))
    cfg = RunnerConfig.for_dtype(dtype)
    if dtype != "float32":
        return AutoPlan(cfg, reason=f"CPU {dtype}: PyTorch (the exported graphs are float32)")
    if exact:
        return AutoPlan(cfg, reason="CPU: PyTorch (exact attention)")
    record = next((r for r in table if r.covers(module, part)), None)
    if record is None:
        return AutoPlan(cfg, reason=f"CPU: PyTorch (no ONNX Runtime measurement for {type(module).__name__} {part})")
    below = "" if record.onnx_below is None else f" below batch {record.onnx_below}"
    return AutoPlan(cfg, (record.onnx_from, record.onnx_below),
                    reason=f"CPU: ONNX Runtime{below} (measured faster: {record.source})")


class BatchDispatchRunner:
    """Two runners of one part, chosen per call by its batch size: ``inner`` for ``lo <= n < hi``, else
    ``outer`` (as ``auto`` runs ONNX Runtime where it was measured faster and eager PyTorch elsewhere)."""

    def __init__(self, inner: object, outer: object, lo: int, hi: int | None) -> None:
        self.inner, self.outer, self.lo, self.hi = inner, outer, lo, hi
        self.part = getattr(outer, "part", "model")
        self.device: torch.device = outer.device  # type: ignore[attr-defined]
        self.dtype: torch.dtype = outer.dtype  # type: ignore[attr-defined]
        span = f"{lo}-{hi - 1}" if hi is not None else f"{lo}+"
        self.name = f"{inner.name}@{span},{outer.name}"  # type: ignore[attr-defined]

    def _pick(self, n: int) -> object:
        return self.inner if self.lo <= n and (self.hi is None or n < self.hi) else self.outer

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        n = int(tensors[0].shape[0]) if tensors and torch.as_tensor(tensors[0]).dim() else 0
        return self._pick(n)(*tensors)  # type: ignore[operator]

    def warmup(self, buckets=None):  # noqa: ANN001, ANN201 - the ModelRunner signature
        self.outer.warmup(buckets)  # type: ignore[attr-defined]
        return self.inner.warmup(buckets)  # type: ignore[attr-defined]

    @property
    def ready(self) -> bool:
        return bool(self.inner.ready and self.outer.ready)  # type: ignore[attr-defined]


__all__ = ["CPU_TABLE", "AutoPlan", "BatchDispatchRunner", "CpuRecord", "auto_dtype", "auto_plan"]


def batch_invariant_runner(runner: object) -> bool:
    """Whether ``runner``'s rows do not depend on their batch-mates, bit for bit, by construction: ONNX Runtime
    on the CPU. Its MLAS kernels split work over output rows and channels, never over the reduction, and pick
    their blocking independently of the batch size, so a row's arithmetic is the same alone or in any batch
    (measured 0.0 difference between batch 1, 8 and 32 for TAEF2 encode / decode and the SiT denoiser;
    ``tests/server/test_server_batch_invariance.py`` checks it over HTTP on the shipped models). PyTorch's CPU
    kernels (oneDNN / MKL) choose algorithms by problem size and differ by ~1e-6; CUDA kernels (split-K GEMMs,
    bf16) give no guarantee either."""
    from models.runtime.exported import OnnxRunner

    return isinstance(runner, OnnxRunner) and runner.providers[0] == "CPUExecutionProvider"
