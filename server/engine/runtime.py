"""Loaded models behind the methods the engine calls (torch eager today; compiled / ONNX runtimes plug in
behind the same methods). All calls are synchronous: the engine runs them in its device thread.

Inputs and outputs are CPU float32 tensors; the runtime moves them to and from its device and dtype.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch
import torch.nn as nn

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
        module = models.load_pretrained(spec.source, allow_pickle=settings.allow_pickle)
    return module.eval()


def enliven(module: nn.Module, std: float = 0.1) -> nn.Module:
    """Make a freshly initialised model's output depend on its inputs: training-time initialisations leave
    tensors constant (adaLN-Zero and final layers at 0, LayerScale at 1e-5), which makes a random SiT/DiT
    output exactly 0 and a random tokenizer nearly blind to its image. Every constant tensor other than
    all-ones (norm scales) is redrawn from N(0, std^2). Used only for registry models served with random
    weights (tests, benchmarks), from the caller's RNG state."""
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and p.numel() > 1 and bool((p == p.flatten()[0]).all()) \
                    and float(p.flatten()[0]) != 1.0:
                p.normal_(0.0, std)
    return module


class Runtime:
    """A model on a device, called without autograd."""

    name = "torch-eager"

    def __init__(self, spec: ModelSpec, module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        if device.type == "cpu" and dtype != torch.float32:
            log.warning("%s: %s on CPU is slow or unsupported; using float32", spec.name, dtype)
            dtype = torch.float32
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.module = module.to(device=device, dtype=dtype).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.to(self.dtype) if x.is_floating_point() else x

    @staticmethod
    def _out(y: torch.Tensor) -> torch.Tensor:
        return y.float().cpu()


class TokenizerRuntime(Runtime):
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 in [-1, 1] -> (B, L, D) float32 tokens."""
        with torch.inference_mode():
            return self._out(self.module.encode(self._in(images)))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) float32 tokens -> (B, 3, H, W) float32 images, unclamped."""
        with torch.inference_mode():
            return self._out(self.module.decode(self._in(tokens)))

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Generator latents (B, L, D) -> tokens: ``x * vq_std + vq_mean`` (float32)."""
        cfg = self.spec.config
        return (latents.double() * cfg.vq_std + cfg.vq_mean).float()


class GeneratorRuntime(Runtime):
    def model_fn(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The sampler's ``ModelFn``: x (N, L, C), t (N,), y (N,) int64 -> (N, L, C_out) float32 on CPU."""
        with torch.inference_mode():
            return self._out(self.module(self._in(x), self._in(t), y.to(self.device)))


def build_runtimes(specs: list[ModelSpec], settings: Settings) -> dict[str, Runtime]:
    """Load every model (in the calling thread) onto the settings' device."""
    device = resolve_device(settings.device)
    dtype = _DTYPES[settings.dtype]
    out: dict[str, Runtime] = {}
    for spec in specs:
        module = load_module(spec, settings)
        cls = TokenizerRuntime if spec.kind == "tokenizer" else GeneratorRuntime
        out[spec.name] = cls(spec, module, device, dtype)
        log.info("loaded %s (%s, %s) on %s", spec.name, spec.family, spec.source, device)
    return out


class DeviceThread:
    """The one thread that runs torch for a device, so model calls never block the event loop and never
    run concurrently with each other."""

    def __init__(self, name: str = "tokserve-device") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
