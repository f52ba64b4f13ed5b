"""Loaded models behind the methods the engine calls: per model kind (tokenizer, generator) a thin adapter
over the runners of the one runtime layer (:mod:`models.runtime`, built by :func:`export.runtime.make_runner`
from ``TOKSERVE_RUNTIME`` / ``TOKSERVE_DTYPE``). All calls are synchronous: the engine runs them in its
device thread.

Tokenizer inputs and outputs are CPU float32 tensors; the runners move them to and from their device and
dtype. A generator's ``model_fn`` takes and returns tensors on the runtime's device (its sampler's rows live
there); the generation loop copies finished rows back once (:func:`to_host`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from models.latent_norm import denormalize_latents
from models.runtime import ModelRunner, batch_invariant_runner
from server.engine.specs import ModelSpec
from server.settings import Settings

log = logging.getLogger("tokserve.runtime")
RANDOM_WEIGHTS_SEED = 0  # registry models get the same random weights in every process
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_module(spec: ModelSpec, settings: Settings) -> nn.Module:
    """Build ``spec``'s model on CPU in eval mode: the checkpoint of a folder, or seeded random weights."""
    import models

    if spec.registry_name is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            module = models.create_model(spec.registry_name)
            enliven(module)
    else:
        with weights_only_unpickling(not settings.unsafe_unpickle_runs_code):
            module = models.load_pretrained(spec.source, allow_pickle=settings.allow_pickle,
                                            unsafe_unpickle=settings.unsafe_unpickle_runs_code)
    return module.eval()


@contextlib.contextmanager
def weights_only_unpickling(enforce: bool = True) -> Iterator[None]:
    """While loading checkpoints, every ``torch.load`` is ``weights_only=True`` whatever its caller asks
    (torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``): a pickle the safe loader refuses fails the start-up instead
    of being retried with full unpickling, which runs whatever code the file names. ``enforce=False``
    (``TOKSERVE_UNSAFE_UNPICKLE_RUNS_CODE``) leaves torch.load alone, with a warning."""
    if not enforce:
        log.warning("!!! TOKSERVE_UNSAFE_UNPICKLE_RUNS_CODE is set: pickle checkpoints may be fully unpickled, "
                    "which runs any code they contain. Use only checkpoints you made yourself. !!!")
        yield
        return
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {n: os.environ.get(n) for n in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def enliven(module: nn.Module, std: float = 0.1) -> nn.Module:
    """Registry models served with random weights: see :func:`models.random_init.enliven` (global RNG)."""
    from models.random_init import enliven as _enliven

    return _enliven(module, std)


class Runtime:
    """A served model on a device, called without autograd: the model parts the engine calls (its
    :class:`~models.runtime.ModelRunner` runners, built by :func:`export.runtime.make_runner` from
    ``backend``: ``auto``, ``torch``, ``torch-compile``, ``torchscript``, ``onnx``) and the module itself.
    Exported backends are exported from ``module`` with a parity check, so results agree with eager torch
    within its tolerance; a reduced ``dtype`` (bf16 / fp16, CPU included) within the reduced-precision one.
    ``exact`` keeps ``auto`` on eager PyTorch on the CPU (exact attention)."""

    def __init__(self, spec: ModelSpec, module: nn.Module, device: torch.device, dtype: torch.dtype,
                 backend: str = "auto", export_dir: str | None = None, *, exact: bool = False,
                 max_batch: int | None = None) -> None:
        self.backend = backend
        self.export_dir = None if export_dir is None else f"{export_dir}/{spec.name}-{backend}"
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.exact = exact
        self.max_batch = max_batch
        self.module = module.to(device).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.runners: dict[str, ModelRunner] = {}
        self.name = "torch-eager"

    def _make_runners(self, parts: tuple[str, ...], **kw: Any) -> dict[str, ModelRunner]:
        from export.runtime import make_runners

        self.runners = make_runners(self.module, parts, self.device, runtime=self.backend,
                                    dtype=str(self.dtype).removeprefix("torch."), cache_dir=self.export_dir,
                                    exact=self.exact, max_batch=self.max_batch, **kw)
        names = list(dict.fromkeys(runner_label(r) for r in self.runners.values()))
        self.name = "/".join(names)
        return self.runners

    def warmup(self) -> None:
        """Pay every runner's first-call costs (compilation, CUDA graph capture) before serving."""
        for runner in self.runners.values():
            runner.warmup()

    @property
    def ready(self) -> bool:
        return all(r.ready for r in self.runners.values())

    @property
    def batch_invariant(self) -> bool:
        """Whether every part of this model runs on a batch-invariant runner (ONNX Runtime on the CPU:
        :func:`models.runtime.batch_invariant_runner`), so a row's result never depends on its batch-mates
        without per-row calls. Models served by PyTorch (or on CUDA) are not, unless
        ``TOKSERVE_BATCH_INVARIANT`` runs them one row per call."""
        return bool(self.runners) and all(batch_invariant_runner(r) for r in self.runners.values())

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        # to the device only: the runner casts each input to its part's dtype (a diffusion time stays float32)
        return x.to(self.device, non_blocking=True)

    @staticmethod
    def _out(y: torch.Tensor) -> torch.Tensor:
        return (y.float() if y.is_floating_point() else y).cpu()


def runner_label(runner: ModelRunner) -> str:
    """What ``/v1/models`` shows as a model's runtime: the runner's name without the ONNX provider
    (``torch-eager``, ``torch-bf16+compile+graphs``, ``onnx``, ``torchscript``, ``onnx@1-31,torch-eager``)."""
    return re.sub(r"\[[^\]]*\]", "", runner.name)


def _torch_only(runtime: Runtime, what: str) -> None:
    """Exported backends and reduced precision cover continuous tokenizers and SiT / DiT denoisers; others
    run PyTorch in float32 (a bf16 codebook search can pick other codes, and the MAR / MaskGIT / VAR samplers
    keep float32 state that a bf16 module does not accept)."""
    if runtime.backend in ("torchscript", "onnx"):
        log.warning("%s: the %s backend does not cover %s; running torch eager", runtime.spec.name,
                    runtime.backend, what)
        runtime.backend = "torch"
    if runtime.dtype != torch.float32:
        log.warning("%s: %s run in float32, not %s", runtime.spec.name, what, runtime.dtype)
        runtime.dtype = torch.float32


class TokenizerRuntime(Runtime):
    """Any tokenizer (:class:`models.surface.Tokenizer`): ``encode`` images -> tokens, ``decode`` tokens ->
    images, each a runner. Tokens are float latents, or int64 codes for a discrete one (``spec.discrete``),
    which the exported backends do not cover."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.discrete = self.spec.discrete
        if self.discrete:
            _torch_only(self, "discrete tokenizers")
        runners = self._make_runners(("encoder", "decoder"))
        self._encode, self._decode = runners["encoder"], runners["decoder"]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 in [-1, 1] -> (B, L, D) float32 tokens, or (B, *code shape) int64 codes."""
        with torch.inference_mode():
            return self._out(self._encode(self._in(images)))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) float32 tokens (or int64 codes) -> (B, 3, H, W) float32 images, unclamped."""
        with torch.inference_mode():
            return self._out(self._decode(self._in(tokens)))

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Generator output -> tokens: latents (B, L, D) ``x * vq_std + vq_mean`` (float32); codes as they are."""
        if self.discrete:
            return latents.long()
        ts = self.spec.token_spec
        assert ts is not None
        # the one normalisation training, evaluation and export use (models.latent_norm), in float32 as there
        return denormalize_latents(latents.float(), ts.latent_mean, ts.latent_std)


class _InferenceModule:
    """A module handed to a step sampler that calls it directly (``model_input="module"``: MAR, MaskGIT,
    VAR ...) or to a sampler as its tokenizer: every call under ``torch.inference_mode``."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return self._module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._module, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with torch.inference_mode():
                return attr(*args, **kwargs)

        return call


class GeneratorRuntime(Runtime):
    """A generator and its family's registered sampler (:func:`models.sampling.sampler_family`). A family
    whose sampler takes ``model_fn`` (SiT, DiT) calls :meth:`model_fn` (any backend: exportable); one whose
    sampler takes the module (MAR, MaskGIT, VAR) calls the module's own methods on the runtime's device and
    dtype, through :attr:`sampler_model`, in eager torch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from models.sampling import sampler_family

        self.family = sampler_family(self.spec.family)
        self.denoiser = self.family.model_input == "model_fn"
        self._forward: Any = self.module
        if not self.denoiser:
            _torch_only(self, f"{self.spec.family} generators")
            self.module.float()  # the sampler calls the module's own methods, in float32
        else:
            self._forward = self._make_runners(("denoiser",))["denoiser"]

    def model_fn(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The sampler's ``ModelFn``: x (N, L, C), t (N,), y (N,) int64 -> (N, L, C_out) float32, on the
        runtime's device both ways: the sampler's rows live there (:meth:`make_sampler`), so a step copies
        nothing to the host (inputs elsewhere are moved to the device first)."""
        with torch.inference_mode():
            out = self._forward(self._on_device(x), self._on_device(t), self._on_device(y))
            return out.float() if out.dtype != torch.float32 else out

    def _on_device(self, x: torch.Tensor) -> torch.Tensor:
        # moved only: the runner casts each input to its part's dtype (a diffusion time stays float32)
        if x.device.type != self.device.type or (self.device.index is not None and x.device != self.device):
            x = x.to(self.device, non_blocking=True)
        return x

    @property
    def sampler_model(self) -> Any:
        """What this family's step sampler takes as its model."""
        return self.model_fn if self.denoiser else _InferenceModule(self.module)

    def make_sampler(self, name: str, tokenizer: TokenizerRuntime | None = None) -> Any:
        """The step sampler ``name`` for this generator, its rows (state, generators) on the runtime's
        device: a ``model_fn`` family computes there in float64 / float32 and calls :meth:`model_fn`; a module
        family also takes the module's dtype. With the paired tokenizer when the family needs one."""
        from models.sampling import get_sampler

        kwargs: dict[str, Any] = {"device": self.device} if self.denoiser else {"device": self.device,
                                                                                "dtype": self.dtype}
        if self.family.needs_tokenizer:
            if tokenizer is None:
                raise ValueError(f"{self.spec.name}: a {self.spec.family} sampler needs its tokenizer")
            kwargs["tokenizer"] = _InferenceModule(tokenizer.module)
        return get_sampler(name, self.spec.config, **kwargs)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``TOKSERVE_DTYPE``: ``auto`` is bfloat16 on CUDA and float32 elsewhere."""
    from models.runtime import auto_dtype

    return _DTYPES[auto_dtype(device) if name == "auto" else name]


def build_runtimes(specs: list[ModelSpec], settings: Settings) -> dict[str, Runtime]:
    """Load every model (in the calling thread) onto the settings' device, each part behind the runner its
    ``TOKSERVE_RUNTIME`` entry and ``TOKSERVE_DTYPE`` choose."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    from export.runtime import parse_runtime_setting

    choice = parse_runtime_setting(settings.runtime)
    exact = settings.attention == "exact"
    out: dict[str, Runtime] = {}
    for spec in specs:
        module = load_module(spec, settings)
        cls = TokenizerRuntime if spec.kind == "tokenizer" else GeneratorRuntime
        backend = choice.kind_for(spec.name)
        # generator rows: a batch of requests, doubled by classifier-free guidance
        rows = settings.max_batch_size * (1 if spec.kind == "tokenizer" else 2)
        out[spec.name] = cls(spec, module, device, dtype, backend=backend, export_dir=settings.export_dir,
                             exact=exact, max_batch=rows)
        log.info("loaded %s (%s, %s) on %s: %s (%s, %s)", spec.name, spec.family, spec.source, device,
                 out[spec.name].name, backend, dtype)
    return out


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Finished rows' tensors (latents on the runtime's device) in host memory: the one copy back of a
    generation. CUDA tensors are copied into pinned buffers without blocking, all of them queued before one
    wait for the copies; CPU tensors are returned as they are."""
    out, streams = [], set()
    for t in tensors:
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            streams.add(torch.cuda.current_stream(t.device))
            t = host
        out.append(t)
    for s in streams:
        s.synchronize()
    return out


class DeviceThread:
    """The one thread that runs torch for a device, so model calls never block the event loop and never
    run concurrently with each other."""

    def __init__(self, name: str = "tokserve-device") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args, **kwargs))

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
