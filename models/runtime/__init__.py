"""The one runtime layer: every model part the server, the benchmarks and export run goes through a
:class:`ModelRunner` built here (PyTorch: eager, ``torch.compile``, bf16/fp16, CUDA graphs over bucketed batch
sizes) or over an exported file (TorchScript, ONNX Runtime).

Import direction: this package is pure models/ (torch, optionally onnxruntime); it never imports export/.
The factory that also *builds* exported files, ``export.runtime.make_runner``, lives in export/ and returns
these runners; the server (``server.engine.runtime``) and the benchmarks (``bench/``, ``export.bench``) call
that factory, or :func:`torch_runner` directly for a PyTorch-only variant.

    from models.runtime import RunnerConfig, torch_runner
    den = torch_runner(sit, "denoiser", "cuda", RunnerConfig.parse("bf16+compile+graphs"))
    den.warmup(); v = den(x, t, y)
"""

from models.runtime.auto import (
    CPU_TABLE,
    AutoPlan,
    BatchDispatchRunner,
    CpuRecord,
    auto_dtype,
    auto_plan,
    batch_invariant_runner,
)
from models.runtime.base import (
    InputSpec,
    ModelRunner,
    RunnerStats,
    RuntimeUnavailable,
    WarmupReport,
    cast_inputs,
    float_output,
)
from models.runtime.buckets import DEFAULT_BUCKETS, Chunk, choose_bucket, normalize_buckets, plan_batches
from models.runtime.config import RunnerConfig
from models.runtime.exported import OnnxRunner, TorchScriptRunner
from models.runtime.precision import (
    DEFAULT_KEEP_FP32,
    PRECISIONS,
    CachedTimestepEmbedder,
    cast_module,
    make_graph_safe,
    precision_context,
    set_fused_attention,
)
from models.runtime.torch_runner import (
    TORCH_PARTS,
    GuardedCompile,
    TorchRunner,
    compile_fn,
    part_fn,
    part_inputs,
    prepare_module,
    runner_name,
    torch_compile_available,
    torch_runner,
)

__all__ = [
    "CPU_TABLE", "DEFAULT_BUCKETS", "DEFAULT_KEEP_FP32", "PRECISIONS", "TORCH_PARTS", "AutoPlan",
    "BatchDispatchRunner", "CachedTimestepEmbedder", "Chunk", "CpuRecord", "GuardedCompile", "InputSpec",
    "ModelRunner", "OnnxRunner", "RunnerConfig", "RunnerStats", "RuntimeUnavailable", "TorchRunner",
    "TorchScriptRunner", "WarmupReport", "auto_dtype", "auto_plan", "batch_invariant_runner",
    "cast_inputs", "cast_module", "choose_bucket",
    "compile_fn", "float_output", "make_graph_safe", "normalize_buckets", "part_fn", "part_inputs",
    "plan_batches", "precision_context", "prepare_module", "runner_name", "set_fused_attention",
    "torch_compile_available", "torch_runner",
]
