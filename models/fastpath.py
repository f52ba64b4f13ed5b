"""The inference fast path, all in PyTorch: reduced precision, SDPA, ``torch.compile`` and CUDA graphs.

    fp = FastPath(FastPathConfig.parse("bf16+compile+graphs"), device="cuda")
    den = fp.denoiser(models.create_model("sit-xl-64x32"))   # prepares the module in place
    report = den.warmup()             # one CUDA graph per bucket (1, 2, 4 ... 256); afterwards den.ready
    v = den(x, t, y)                  # the samplers' ModelFn: x (N, L, C), t (N,), y (N,) -> (N, L, C_out) fp32

Precision modes (``FastPathConfig.precision``):

* ``fp32``: float32 weights and math, TF32 off (the official evaluation setting);
* ``tf32``: float32 weights, TF32 tensor-core matmuls and convolutions allowed;
* ``bf16-autocast``: float32 weights, the call under ``torch.autocast(bfloat16)`` (the reference setting of
  the tokenizer benchmarks);
* ``bf16`` / ``fp16``: weights cast. The submodules named in ``keep_fp32`` (default: the SiT/DiT time
  embedder and the soft quantizer, both tiny) stay float32: their floating inputs are cast up and their
  outputs back down, so a diffusion time keeps its float32 resolution (bf16 has 8 bits of mantissa: 250
  time steps near t = 1 would collapse) and the 8192-way soft assignment keeps its float32 softmax.

The samplers keep their state in float64 (SiT) or float32 (DiT) and call the model with float32 ``x, t``;
the denoiser casts ``x`` to the weight dtype in its input buffer, keeps ``t`` in float32 and returns float32.

Every request of N rows runs as chunks padded to a bucket size (:func:`plan_batches`): padding rows hold a
valid dummy input (zeros, and the class ``pad_class``), are computed and dropped. Rows never interact inside
these models (attention is per sample), so padding changes no real row's result beyond the round-off of a
different matmul shape. With ``cuda_graphs`` on a CUDA device each bucket is captured once at
:meth:`BucketedRunner.warmup` into a graph with static input and output buffers; elsewhere (CPU, or graphs
off) the same bucketing and padding runs eagerly, so the bookkeeping is testable without a GPU. ``ready``
turns true when warm-up (graph capture) has finished; the server's ``/readyz`` waits for it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from models.dit import Attention as DiTAttention
from models.dit import TimestepEmbedder
from models.layers.vit import Attention as ViTAttention

log = logging.getLogger("tokserve.fastpath")

PRECISIONS = ("fp32", "tf32", "bf16-autocast", "bf16", "fp16")
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Submodules kept in float32 when the weights are cast (those present in a module are used).
DEFAULT_KEEP_FP32 = ("t_embedder", "quantize")
_CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class FastPathConfig:
    """How a model runs. ``compile_mode`` is passed to ``torch.compile`` (None = its default); with
    ``cuda_graphs`` on, use a mode without inductor's own graphs (``default``, ``max-autotune-no-cudagraphs``).
    ``compile_dynamic`` compiles one graph for every batch size instead of one per bucket."""

    precision: str = "bf16"
    compile: bool = False
    compile_mode: str | None = None
    compile_dynamic: bool = False
    cuda_graphs: bool = True
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    channels_last: bool = False
    fused_attention: bool = True
    keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        normalize_buckets(self.buckets)
        if self.compile and self.cuda_graphs and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile mode {self.compile_mode!r} captures its own CUDA graphs; with cuda_graphs "
                             "use 'default' or 'max-autotune-no-cudagraphs'")

    @classmethod
    def parse(cls, spec: str, **overrides: Any) -> FastPathConfig:
        """``"bf16+compile+graphs"`` -> a config. Tokens after the precision: ``compile``, ``dyn`` (dynamic
        compile), ``autotune`` (mode max-autotune-no-cudagraphs), ``graphs``, ``cl`` (channels-last),
        ``math`` (explicit attention instead of SDPA). Graphs are off unless named."""
        precision, *flags = spec.strip().split("+")
        known = {"compile", "dyn", "autotune", "graphs", "cl", "math"}
        unknown = sorted(set(flags) - known)
        if unknown:
            raise ValueError(f"unknown fast-path flags {unknown} in {spec!r}; known: {sorted(known)}")
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
        return _CAST.get(self.precision, torch.float32)


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


# ------------------------------------------------------------------------------------------- bucketing


def normalize_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique positive bucket sizes; ``ValueError`` when empty or not positive."""
    out = tuple(sorted({int(b) for b in buckets}))
    if not out or out[0] < 1:
        raise ValueError(f"buckets must be positive integers, got {tuple(buckets)}")
    return out


def choose_bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``n`` rows (the largest bucket when none does: callers chunk)."""
    if n < 1:
        raise ValueError(f"need at least one row, got {n}")
    b = normalize_buckets(buckets)
    return next((x for x in b if x >= n), b[-1])


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of a request, run padded to ``bucket`` rows."""

    start: int
    stop: int
    bucket: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def padding(self) -> int:
        return self.bucket - self.rows


def plan_batches(n: int, buckets: Sequence[int]) -> list[Chunk]:
    """Split ``n`` rows into chunks of at most the largest bucket, each padded to its smallest bucket:
    ``plan_batches(300, (64, 256))`` -> rows 0-256 in 256, rows 256-300 in 64."""
    b = normalize_buckets(buckets)
    chunks, start = [], 0
    while start < n:
        rows = min(n - start, b[-1])
        chunks.append(Chunk(start, start + rows, choose_bucket(rows, b)))
        start += rows
    if not chunks:
        raise ValueError(f"need at least one row, got {n}")
    return chunks


# ------------------------------------------------------------------------------------------ preparing


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
    casting floating inputs up to float32 and a tensor output back to ``dtype``). Returns ``module``."""
    module.to(dtype)
    if dtype == torch.float32:
        return module
    for name in keep_fp32:
        try:
            sub = module.get_submodule(name)
        except AttributeError:
            continue
        sub.float()
        sub.register_forward_pre_hook(lambda _m, args: _cast_floats(args, torch.float32))
        sub.register_forward_hook(lambda _m, _args, out, dt=dtype: out.to(dt) if isinstance(out, torch.Tensor)
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
        return self.mlp(f)


def make_graph_safe(module: nn.Module) -> nn.Module:
    """Swap every :class:`TimestepEmbedder` under ``module`` for a :class:`CachedTimestepEmbedder`."""
    for name, sub in list(module.named_modules()):
        if isinstance(sub, TimestepEmbedder):
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(parent, name.rpartition(".")[2], CachedTimestepEmbedder(sub))
    return module


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


def compile_fn(fn: Callable[..., Any], config: FastPathConfig) -> tuple[Callable[..., Any], str]:
    """``torch.compile(fn)`` guarded by :class:`GuardedCompile`, or ``fn`` itself with the reason."""
    if not config.compile:
        return fn, "eager"
    if not hasattr(torch, "compile"):
        return fn, "eager (torch.compile unavailable)"
    try:
        _raise_recompile_limit(len(config.buckets) + 8)
        compiled = torch.compile(fn, mode=config.compile_mode, dynamic=config.compile_dynamic)
    except Exception as exc:  # noqa: BLE001
        return fn, f"eager (torch.compile failed: {type(exc).__name__})"
    kind = ", dynamic" if config.compile_dynamic else ""
    return GuardedCompile(compiled, fn), f"compiled ({config.compile_mode or 'default'}{kind})"


# ------------------------------------------------------------------------------------------- the runner


@dataclass(frozen=True)
class InputSpec:
    """One batched argument of a runner: per-row shape, dtype in the buffer, value of padding rows."""

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
    """What :meth:`BucketedRunner.warmup` did: per-bucket seconds, graphs or eager, when it finished."""

    name: str
    mode: str
    buckets: tuple[int, ...]
    seconds: dict[int, float] = field(default_factory=dict)
    total_s: float = 0.0
    finished_at: float = 0.0
    compile: str = "eager"


class BucketedRunner:
    """``fn(*batched inputs) -> (B, ...)`` run over any N rows as bucket-padded chunks.

    ``specs`` describe the inputs (one per positional argument, all sharing the row count). Outputs are
    copied out of the (static) output buffer, optionally converted to ``out_dtype``. Calls must come from
    one thread (the engine's device thread). Graphs are used when ``graphs`` and the device is CUDA;
    otherwise the chunks run eagerly through the same buffers.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], specs: Sequence[InputSpec], *, device: torch.device | str,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, graphs: bool = True,
                 context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                 out_dtype: torch.dtype | None = None, warm_iters: int = 2, name: str = "model",
                 compile_note: str = "eager") -> None:
        self.fn = fn
        self.specs = tuple(specs)
        self.device = torch.device(device)
        self.buckets = normalize_buckets(buckets)
        self.use_graphs = bool(graphs) and self.device.type == "cuda" and torch.cuda.is_available()
        self.context = context
        self.out_dtype = out_dtype
        self.warm_iters = warm_iters
        self.name = name
        self.compile_note = compile_note
        self.stats = RunnerStats()
        self._buffers: dict[int, tuple[torch.Tensor, ...]] = {}
        self._graphs: dict[int, tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None
        self._ready = threading.Event()

    # -------------------------------------------------------------------------------- state

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
        """The input buffers of ``bucket`` (allocated on first use, filled with padding values)."""
        if bucket not in self._buffers:
            bufs = []
            for s in self.specs:
                t = torch.full((bucket, *s.row_shape), s.pad_value, dtype=s.dtype, device=self.device)
                if s.channels_last and t.dim() == 4:
                    t = t.contiguous(memory_format=torch.channels_last)
                bufs.append(t)
            self._buffers[bucket] = tuple(bufs)
        return self._buffers[bucket]

    # -------------------------------------------------------------------------------- calls

    def _check(self, args: Sequence[torch.Tensor]) -> int:
        if len(args) != len(self.specs):
            raise TypeError(f"{self.name}: expected {len(self.specs)} inputs, got {len(args)}")
        n = args[0].shape[0] if args[0].dim() else 0
        for a, s in zip(args, self.specs, strict=True):
            if a.dim() != 1 + len(s.row_shape) or tuple(a.shape[1:]) != s.row_shape or a.shape[0] != n:
                raise ValueError(f"{self.name}: expected ({n}, {', '.join(map(str, s.row_shape))}) inputs, "
                                 f"got {tuple(a.shape)}")
        if n < 1:
            raise ValueError(f"{self.name}: empty batch")
        return n

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        n = self._check(args)
        self.stats.calls += 1
        outs = [self._run(c, [a[c.start:c.stop] for a in args]) for c in plan_batches(n, self.buckets)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @torch.no_grad()
    def _run(self, chunk: Chunk, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        bufs = self.buffers(chunk.bucket)
        for buf, part, spec in zip(bufs, parts, self.specs, strict=True):
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
            raise TypeError(f"{self.name}: the function must return one tensor, got {type(out).__name__}")
        return out[: chunk.rows].to(dtype=self.out_dtype or out.dtype, copy=True)

    # -------------------------------------------------------------------------------- warm-up

    @torch.no_grad()
    def warmup(self, buckets: Sequence[int] | None = None) -> WarmupReport:
        """Run (eager: compile) or capture (graphs) every bucket in ``buckets`` (default: all), largest
        first so that the graphs share one memory pool; then set :attr:`ready`."""
        sizes = self.buckets if buckets is None else normalize_buckets(buckets)
        missing = sorted(set(sizes) - set(self.buckets))
        if missing:
            raise ValueError(f"{self.name}: buckets {missing} are not among {self.buckets}")
        report = WarmupReport(self.name, self.mode, sizes, compile=self.compile_note)
        t0 = time.perf_counter()
        for b in sorted(sizes, reverse=True):
            tb = time.perf_counter()
            if self.use_graphs:
                self._capture(b)
            else:
                with self.context():
                    self.fn(*self.buffers(b))
            report.seconds[b] = time.perf_counter() - tb
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        report.total_s = time.perf_counter() - t0
        report.finished_at = time.time()
        self._ready.set()
        return report

    def _capture(self, bucket: int) -> None:
        bufs = self.buffers(bucket)
        for buf, spec in zip(bufs, self.specs, strict=True):
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


# -------------------------------------------------------------------------------- denoiser and tokenizer


class CUDAGraphDenoiser(BucketedRunner):
    """A SiT / DiT forward as the samplers' ``ModelFn``: x (N, L, C), t (N,), y (N,) int64 ->
    (N, L, C_out) float32, on bucketed CUDA graphs (or eager with the same padding on CPU).

    Padding rows are x = 0, t = 0, y = ``pad_class`` (any class in [0, num_classes]; the null class is
    ``num_classes``). ``fn`` defaults to ``module`` (pass a compiled version to use one).
    """

    def __init__(self, module: nn.Module, *, device: torch.device | str | None = None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, graphs: bool = True,
                 input_dtype: torch.dtype | None = None,
                 context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                 fn: Callable[..., torch.Tensor] | None = None, pad_class: int = 0, warm_iters: int = 2,
                 compile_note: str = "eager") -> None:
        cfg = module.config  # type: ignore[attr-defined]
        if not 0 <= pad_class <= cfg.num_classes:
            raise ValueError(f"pad_class {pad_class} is not in [0, {cfg.num_classes}]")
        weight = module.x_embedder.weight  # type: ignore[attr-defined]
        specs = (InputSpec((cfg.num_tokens, cfg.token_dim), input_dtype or weight.dtype, 0.0),
                 InputSpec((), torch.float32, 0.0),
                 InputSpec((), torch.long, pad_class))
        super().__init__(fn or module, specs, device=device or weight.device, buckets=buckets, graphs=graphs,
                         context=context, out_dtype=torch.float32, warm_iters=warm_iters,
                         name=f"denoiser[{type(module).__name__}]", compile_note=compile_note)
        self.module = module
        self.pad_class = pad_class


class FastTokenizer:
    """``encode`` (N, 3, H, W) -> (N, L, D) float32 and ``decode`` (N, L, D) -> (N, 3, H, W) float32 of a
    SoftVQ-style tokenizer, each on its own :class:`BucketedRunner`."""

    def __init__(self, module: nn.Module, encoder: BucketedRunner, decoder: BucketedRunner) -> None:
        self.module = module
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens)

    def warmup(self, buckets: Sequence[int] | None = None) -> tuple[WarmupReport, WarmupReport]:
        return self.encoder.warmup(buckets), self.decoder.warmup(buckets)

    @property
    def ready(self) -> bool:
        return self.encoder.ready and self.decoder.ready


class FastPath:
    """Applies a :class:`FastPathConfig` on ``device``: prepares modules and wraps them in runners."""

    def __init__(self, config: FastPathConfig | None = None, device: torch.device | str = "cuda") -> None:
        self.config = config or FastPathConfig()
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("FastPath on cuda, but no CUDA device is available")

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of the tensors handed to the module (the weight dtype; float32 under autocast)."""
        return self.config.weight_dtype

    def context(self) -> contextlib.AbstractContextManager[None]:
        return precision_context(self.config.precision, self.device)

    def prepare(self, module: nn.Module) -> nn.Module:
        """In place: eval, no grads, graph-safe time embedding, to the device, cast, attention kind,
        channels-last convolutions. ``copy.deepcopy`` first to keep the original."""
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        make_graph_safe(module)
        module.to(self.device)
        cast_module(module, self.config.weight_dtype, self.config.keep_fp32)
        set_fused_attention(module, self.config.fused_attention)
        if self.config.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def _runner_kw(self) -> dict[str, Any]:
        return {"device": self.device, "buckets": self.config.buckets, "graphs": self.config.cuda_graphs,
                "context": self.context}

    def denoiser(self, module: nn.Module, pad_class: int = 0, *, copy_module: bool = False) -> CUDAGraphDenoiser:
        """A prepared (optionally copied) generator behind a :class:`CUDAGraphDenoiser`."""
        module = self.prepare(copy.deepcopy(module) if copy_module else module)
        fn, note = compile_fn(module, self.config)
        return CUDAGraphDenoiser(module, input_dtype=self.input_dtype, fn=fn, pad_class=pad_class,
                                 compile_note=note, **self._runner_kw())

    def tokenizer(self, module: nn.Module, *, copy_module: bool = False) -> FastTokenizer:
        """A prepared (optionally copied) SoftVQ-style tokenizer behind two runners."""
        module = self.prepare(copy.deepcopy(module) if copy_module else module)
        cfg = module.config  # type: ignore[attr-defined]
        size = cfg.image_size
        enc, enc_note = compile_fn(module.encode, self.config)  # type: ignore[attr-defined]
        dec, dec_note = compile_fn(module.decode, self.config)  # type: ignore[attr-defined]
        kw = self._runner_kw()
        encoder = BucketedRunner(enc, (InputSpec((3, size, size), self.input_dtype, 0.0, self.config.channels_last),),
                                 out_dtype=torch.float32, name="encode", compile_note=enc_note, **kw)
        decoder = BucketedRunner(dec, (InputSpec((cfg.num_tokens, cfg.token_dim), self.input_dtype, 0.0),),
                                 out_dtype=torch.float32, name="decode", compile_note=dec_note, **kw)
        return FastTokenizer(module, encoder, decoder)

    def with_config(self, **changes: Any) -> FastPath:
        return FastPath(replace(self.config, **changes), self.device)


__all__ = [
    "DEFAULT_BUCKETS",
    "PRECISIONS",
    "BucketedRunner",
    "CUDAGraphDenoiser",
    "CachedTimestepEmbedder",
    "Chunk",
    "FastPath",
    "FastPathConfig",
    "FastTokenizer",
    "GuardedCompile",
    "InputSpec",
    "RunnerStats",
    "WarmupReport",
    "cast_module",
    "choose_bucket",
    "compile_fn",
    "make_graph_safe",
    "normalize_buckets",
    "plan_batches",
    "precision_context",
    "set_fused_attention",
]
