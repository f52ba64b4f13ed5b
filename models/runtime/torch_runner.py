"""PyTorch runners: eager, ``torch.compile``, reduced precision and CUDA graphs with bucketed batch sizes.

    runner = torch_runner(models.create_model("sit-xl-64x32"), "denoiser", "cuda",
                          RunnerConfig.parse("bf16+compile+graphs"))    # prepares the module in place
    report = runner.warmup()      # one CUDA graph per bucket (1, 2, 4 ... 256); afterwards runner.ready
    v = runner(x, t, y)           # the samplers' ModelFn: x (N, L, C), t (N,), y (N,) -> (N, L, C_out) float32

Parts: ``encoder`` (``module.encode``: images (B, 3, H, W) -> tokens), ``decoder`` (``module.decode``: tokens
(B, L, D) float or (B, *code shape) int64 -> images (B, 3, H, W)), ``denoiser`` (``module(x, t, y)``); any
other callable through :class:`TorchRunner` directly.

A bucketed runner (graphs, or a static-shape compile) runs every request of N rows as chunks padded to a
bucket size (:func:`~models.runtime.buckets.plan_batches`): padding rows hold a valid dummy input (zeros, and
the class ``pad_class``), are computed and dropped. Rows never interact inside these models (attention is per
sample), so padding changes no real row's result beyond the round-off of a different matmul shape. With
graphs on a CUDA device each bucket is captured once at :meth:`TorchRunner.warmup` into a graph with static
input and output buffers; elsewhere (CPU) the same bucketing and padding runs eagerly, so the bookkeeping is
testable without a GPU. An unbucketed runner (plain eager, or a dynamic compile) calls straight through.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from models.runtime.base import (
    InputSpec,
    RunnerStats,
    RuntimeUnavailable,
    WarmupReport,
    cast_inputs,
    float_output,
)
from models.runtime.buckets import Chunk, normalize_buckets, plan_batches
from models.runtime.config import RunnerConfig
from models.runtime.precision import cast_module, make_graph_safe, precision_context, set_fused_attention

log = logging.getLogger("tokserve.runtime")

TORCH_PARTS = ("encoder", "decoder", "denoiser")


# ---------------------------------------------------------------------------------------------- compiling


def torch_compile_available(device: str | torch.device = "cpu") -> bool:
    """``torch.compile`` needs a C++ compiler on the CPU, and triton on CUDA."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def _raise_recompile_limit(n: int) -> None:
    """torch.compile recompiles a static-shape function once per bucket; its default limit is 8."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < n:
            setattr(cfg, name, n)


class GuardedCompile:
    """A compiled function that falls back to ``eager`` for good if compiling or running it fails once
    (a missing compiler, an unsupported op): the error is logged and kept in ``error``."""

    def __init__(self, compiled: Callable[..., Any], eager: Callable[..., Any]) -> None:
        self.compiled = compiled
        self.eager = eager
        self.error: str | None = None

    @property
    def active(self) -> bool:
        return self.error is None

    def __call__(self, *args: Any) -> Any:
        if self.error is None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compile failure means: run eager
                self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.warning("torch.compile failed, running eager from now on: %s", self.error)
        return self.eager(*args)


def compile_fn(fn: Callable[..., Any], config: RunnerConfig,
               bucketed: bool | None = None) -> tuple[Callable[..., Any], str]:
    """``torch.compile(fn)`` guarded by :class:`GuardedCompile`, or ``fn`` itself with the reason. A bucketed
    call (default: the config has buckets) compiles static shapes, one per bucket; an unbucketed one lets
    torch decide (dynamic after the first new shape)."""
    if not config.compile:
        return fn, "eager"
    if not hasattr(torch, "compile"):
        return fn, "eager (torch.compile unavailable)"
    try:
        _raise_recompile_limit(len(config.buckets or ()) + 8)
        bucketed = config.buckets is not None if bucketed is None else bucketed
        dynamic = True if config.compile_dynamic else (False if bucketed else None)
        compiled = torch.compile(fn, mode=config.compile_mode, dynamic=dynamic)
    except Exception as exc:  # noqa: BLE001
        return fn, f"eager (torch.compile failed: {type(exc).__name__})"
    kind = ", dynamic" if config.compile_dynamic else ""
    return GuardedCompile(compiled, fn), f"compiled ({config.compile_mode or 'default'}{kind})"


def runner_name(config: RunnerConfig) -> str:
    """``torch-eager`` (fp32, no flags), ``torch-compile``, ``torch-bf16``, ``torch-bf16+compile+graphs`` ..."""
    label = config.label
    if label == "fp32":
        return "torch-eager"
    return "torch-" + label.removeprefix("fp32+")


# ---------------------------------------------------------------------------------------------- the runner


class TorchRunner:
    """``fn(*batched inputs) -> (B, ...)`` on ``device``, bucketed (``buckets``) or straight through (None).

    ``specs`` describe the inputs (one per positional argument, all sharing the row count); a bucketed runner
    needs them, an unbucketed one casts by them when given (else floating inputs to ``input_dtype``).
    Floating outputs come back as float32 copies (never the static output buffer of a graph). Calls must come
    from one thread (the engine's device thread). Graphs are used when ``graphs`` and the device is CUDA.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], specs: Sequence[InputSpec] | None, *,
                 device: torch.device | str, buckets: Sequence[int] | None = None, graphs: bool = False,
                 precision: str = "fp32", input_dtype: torch.dtype | None = None, warm_iters: int = 2,
                 name: str = "torch-eager", part: str = "model", compile_note: str = "eager",
                 module: nn.Module | None = None) -> None:
        self.fn = fn
        self.specs = None if specs is None else tuple(specs)
        self.device = torch.device(device)
        self.buckets = None if buckets is None else normalize_buckets(buckets)
        if self.buckets is not None and self.specs is None:
            raise ValueError(f"{part}: a bucketed runner needs its input specs")
        self.use_graphs = (bool(graphs) and self.buckets is not None and self.device.type == "cuda"
                           and torch.cuda.is_available())
        self.precision = precision
        self.dtype = input_dtype or (self.specs[0].dtype if self.specs else torch.float32)
        self.warm_iters = warm_iters
        self.name = name
        self.part = part
        self.compile_note = compile_note
        self.module = module
        self.stats = RunnerStats()
        self._buffers: dict[int, tuple[torch.Tensor, ...]] = {}
        self._graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None
        self._ready = threading.Event()

    # -------------------------------------------------------------------------------- state

    def context(self) -> contextlib.AbstractContextManager[None]:
        return precision_context(self.precision, self.device)

    @property
    def mode(self) -> str:
        return "cuda-graphs" if self.use_graphs else "eager"

    @property
    def ready(self) -> bool:
        """True once :meth:`warmup` has finished (every requested graph captured)."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def captured(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def buffers(self, bucket: int) -> tuple[torch.Tensor, ...]:
        """The input buffers of ``bucket`` rows (allocated on first use, filled with padding values)."""
        if bucket not in self._buffers:
            assert self.specs is not None
            bufs = []
            for s in self.specs:
                t = torch.full((bucket, *s.row_shape), s.pad_value, dtype=s.dtype, device=self.device)
                if s.channels_last and t.dim() == 4:
                    t = t.contiguous(memory_format=torch.channels_last)
                bufs.append(t)
            self._buffers[bucket] = tuple(bufs)
        return self._buffers[bucket]

    def __repr__(self) -> str:
        return f"<TorchRunner {self.part} {self.name} ({self.mode}) on {self.device}>"

    # -------------------------------------------------------------------------------- calls

    def _check(self, args: Sequence[torch.Tensor]) -> int:
        assert self.specs is not None
        if len(args) != len(self.specs):
            raise TypeError(f"{self.part} takes {len(self.specs)} tensors, got {len(args)}")
        n = args[0].shape[0] if args[0].dim() else 0
        for a, s in zip(args, self.specs, strict=True):
            if a.dim() != 1 + len(s.row_shape) or tuple(a.shape[1:]) != s.row_shape or a.shape[0] != n:
                raise ValueError(f"{self.part}: expected ({n}, {', '.join(map(str, s.row_shape))}) inputs, "
                                 f"got {tuple(a.shape)}")
        if n < 1:
            raise ValueError(f"{self.part}: empty batch")
        return n

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.buckets is None:
            return self._direct(args)
        n = self._check(args)
        self.stats.calls += 1
        outs = [self._run(c, [a[c.start:c.stop] for a in args]) for c in plan_batches(n, self.buckets)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _direct(self, args: Sequence[torch.Tensor]) -> torch.Tensor:
        inputs = cast_inputs(self.part, args, self.specs, self.device, self.dtype)
        with torch.inference_mode(), self.context():
            out = self.fn(*inputs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{self.part}: the function must return one tensor, got {type(out).__name__}")
        n = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 0
        self.stats.calls += 1
        self.stats.rows += n
        self.stats.eager_runs += 1
        return float_output(out)

    @torch.no_grad()
    def _run(self, chunk: Chunk, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        bufs = self.buffers(chunk.bucket)
        for buf, part, spec in zip(bufs, parts, self.specs or (), strict=True):
            buf[: chunk.rows].copy_(part, non_blocking=True)
            if chunk.padding:
                buf[chunk.rows:].fill_(spec.pad_value)
        self.stats.rows += chunk.rows
        self.stats.padded_rows += chunk.padding
        graph = self._graphs.get(chunk.bucket)
        if graph is not None:
            graph[0].replay()
            out = graph[1]
            self.stats.replays += 1
        else:
            with self.context():
                out = self.fn(*bufs)
            self.stats.eager_runs += 1
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{self.part}: the function must return one tensor, got {type(out).__name__}")
        out = out[: chunk.rows]
        return out.to(dtype=torch.float32 if out.is_floating_point() else out.dtype, copy=True)

    # -------------------------------------------------------------------------------- warm-up

    @torch.no_grad()
    def warmup(self, buckets: Sequence[int] | None = None) -> WarmupReport:
        """Run (eager: compile) or capture (graphs) every bucket in ``buckets`` (default: all), largest
        first so that the graphs share one memory pool; then set :attr:`ready`. An unbucketed runner runs one
        call of dummy rows per size in ``buckets`` (default: 1) when it knows its input specs."""
        if self.buckets is None:
            sizes = normalize_buckets(buckets or (1,))
        else:
            sizes = self.buckets if buckets is None else normalize_buckets(buckets)
            missing = sorted(set(sizes) - set(self.buckets))
            if missing:
                raise ValueError(f"{self.part}: buckets {missing} are not among {self.buckets}")
        report = WarmupReport(self.part, self.mode, sizes, compile=self.compile_note)
        t0 = time.perf_counter()
        for b in sorted(sizes, reverse=True):
            tb = time.perf_counter()
            if self.use_graphs:
                try:
                    self._capture(b)
                except Exception as exc:  # noqa: BLE001 - an op that cannot be captured: run eagerly instead
                    log.warning("%s: CUDA graph capture failed at batch %d, running eagerly (%s: %s)", self.part,
                                b, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                    self.use_graphs = False
                    self._graphs.clear()
                    report.mode = self.mode
            elif self.specs is not None:
                with self.context():
                    self.fn(*self.buffers(b))
                if self.buckets is None:
                    self._buffers.pop(b)  # nothing is replayed through them
            report.seconds[b] = time.perf_counter() - tb
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        report.total_s = time.perf_counter() - t0
        report.finished_at = time.time()
        self._ready.set()
        return report

    def _capture(self, bucket: int) -> None:
        bufs = self.buffers(bucket)
        for buf, spec in zip(bufs, self.specs or (), strict=True):
            buf.fill_(spec.pad_value)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up (and compile) outside the capture
            for _ in range(max(1, self.warm_iters)):
                with self.context():
                    self.fn(*bufs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            with self.context():
                out = self.fn(*bufs)
        torch.cuda.synchronize(self.device)
        self._graphs[bucket] = (graph, out)


# ------------------------------------------------------------------------------------------- building


def prepare_module(module: nn.Module, config: RunnerConfig, device: torch.device | str) -> nn.Module:
    """In place: eval, no grads, graph-safe time embedding (with graphs), to the device, cast (keeping the
    ``keep_fp32`` submodules float32), attention kind, channels-last convolutions. ``copy.deepcopy`` first to
    keep the original. Preparing twice with the same config (an encoder and a decoder runner of one
    tokenizer) is harmless."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    if config.cuda_graphs:
        make_graph_safe(module)
    module.to(torch.device(device))
    floats = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if config.weight_dtype != torch.float32 or floats - {torch.float32}:
        cast_module(module, config.weight_dtype, config.keep_fp32)
    if not config.fused_attention:
        set_fused_attention(module, False)
    if config.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def _config(module: nn.Module) -> Any:
    return getattr(module, "config", None)


def part_inputs(module: nn.Module, part: str, input_dtype: torch.dtype = torch.float32, *,
                channels_last: bool = False, pad_class: int = 0) -> tuple[InputSpec, ...] | None:
    """The :class:`InputSpec` of ``part`` of ``module``, read from its token spec or config; None when the
    module does not say (then the runner cannot bucket). Image and latent tensors in ``input_dtype``; a
    diffusion time float32; classes and codes int64."""
    cfg = _config(module)
    try:
        spec = getattr(module, "token_spec", None)
    except (NotImplementedError, TypeError, KeyError, ValueError):  # a tokenizer outside the registry
        spec = None
    if part == "encoder":
        size = getattr(spec, "image_size", None) or getattr(cfg, "image_size", None)
        if size is None:
            return None
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return (InputSpec((3, h, w), input_dtype, 0.0, channels_last),)
    if part == "decoder":
        if spec is not None:
            discrete = spec.dtype == "int64"
            return (InputSpec(tuple(spec.shape), torch.long if discrete else input_dtype, 0),)
        if hasattr(cfg, "num_tokens") and hasattr(cfg, "token_dim"):
            return (InputSpec((cfg.num_tokens, cfg.token_dim), input_dtype, 0.0),)
        return None
    if part == "denoiser":
        length = getattr(cfg, "num_tokens", None) or getattr(cfg, "input_size", None)
        chans = getattr(cfg, "token_dim", None) or getattr(cfg, "in_channels", None)
        if length is None or chans is None:
            return None
        num_classes = getattr(cfg, "num_classes", None)
        if num_classes is not None and not 0 <= pad_class <= num_classes:
            raise ValueError(f"pad_class {pad_class} is not in [0, {num_classes}]")
        return (InputSpec((int(length), int(chans)), input_dtype, 0.0), InputSpec((), torch.float32, 0.0),
                InputSpec((), torch.long, pad_class))
    raise ValueError(f"no PyTorch part {part!r}; parts are {TORCH_PARTS}")


def part_fn(module: nn.Module, part: str) -> Callable[..., torch.Tensor]:
    """What a part calls: ``module.encode``, ``module.decode`` or the module itself (a denoiser)."""
    if part == "encoder":
        return module.encode  # type: ignore[return-value]
    if part == "decoder":
        return module.decode  # type: ignore[return-value]
    if part == "denoiser":
        return module
    raise ValueError(f"no PyTorch part {part!r}; parts are {TORCH_PARTS}")


def torch_runner(module: nn.Module, part: str, device: torch.device | str,
                 config: RunnerConfig | str = RunnerConfig(), *, pad_class: int = 0, copy_module: bool = False,
                 fn: Callable[[nn.Module], Callable[..., torch.Tensor]] | None = None,
                 specs: Sequence[InputSpec] | None = None, require_compile: bool = False) -> TorchRunner:
    """``part`` of ``module`` (prepared in place, or a copy with ``copy_module``) behind a :class:`TorchRunner`
    run as ``config`` says (a :class:`RunnerConfig` or its variant string). For a part beyond
    :data:`TORCH_PARTS`, ``fn(prepared module)`` gives its callable and ``specs`` its inputs.
    ``require_compile`` raises :class:`RuntimeUnavailable` where ``torch.compile`` cannot run, instead of
    running eager."""
    cfg = RunnerConfig.parse(config) if isinstance(config, str) else config
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeUnavailable("a CUDA runner, but no CUDA device is available")
    if cfg.compile and require_compile and not torch_compile_available(dev):
        raise RuntimeUnavailable(f"torch.compile is not available on {dev} here")
    module = prepare_module(copy.deepcopy(module) if copy_module else module, cfg, dev)
    if specs is None:
        specs = part_inputs(module, part, cfg.weight_dtype, channels_last=cfg.channels_last, pad_class=pad_class)
    buckets = cfg.buckets if specs is not None else None
    if cfg.buckets is not None and specs is None:
        log.warning("%s of %s: no input shapes to bucket by; running unbucketed", part, type(module).__name__)
    call, note = compile_fn(fn(module) if fn else part_fn(module, part), cfg, bucketed=buckets is not None)
    return TorchRunner(call, specs, device=dev, buckets=buckets, graphs=cfg.cuda_graphs,
                       precision=cfg.precision, input_dtype=cfg.weight_dtype, name=runner_name(cfg), part=part,
                       compile_note=note, module=module)


__all__ = ["TORCH_PARTS", "GuardedCompile", "TorchRunner", "compile_fn", "part_fn", "part_inputs", "prepare_module",
           "runner_name", "torch_compile_available", "torch_runner"]
