"""Runtimes: one loaded model part behind PyTorch eager, ``torch.compile``, TorchScript or ONNX Runtime.

The server calls every runtime the same way::

    rt = load_runtime("onnx", "exports/softvq-s-64", "encoder", "cpu")
    tokens = rt(images)                                    # (B, 3, H, W) -> (B, L, D)

    tok = TokenizerRuntime.load("torchscript", "exports/softvq-s-64", "cpu")
    tokens, images = tok.encode(images), tok.decode(tokens)
    den = DenoiserRuntime.load("torch", generator_model, "cuda")
    out = den(x, t, y)                                     # a sampler ``model_fn``

``source`` may be a loaded ``nn.Module``, a checkpoint folder (``config.json`` + safetensors), an export folder
(``export.json``, written by ``python -m export``) or a registry name (random weights; for tests). TorchScript
and ONNX runtimes built from a model (not an export folder) export it first, with the parity check, into
``cache_dir`` (a fresh temporary folder by default).

Every runtime casts its inputs to the part's declared dtypes (float32, int64 for classes) and device, and
returns float32 on the runtime's device, so results do not depend on the runtime beyond the parity tolerance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from export.metadata import MODEL_DIR, is_export_dir, read_metadata
from export.parts import PartSpec, build_part, model_facts

RUNTIME_KINDS = ("torch", "torch-compile", "torchscript", "onnx")
FORMAT_OF_KIND = {"torchscript": "torchscript", "onnx": "onnx"}
RUNTIME_ENV = "TOKSERVE_RUNTIME"
log = logging.getLogger("tokserve.export")

Source = nn.Module | str | os.PathLike[str]


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot run here (no C++ compiler for torch.compile, missing export file ...)."""


class Runtime(ABC):
    """A callable part: ``rt(*tensors) -> tensor``; ``name`` says what runs it (e.g. ``onnx[CPU]``)."""

    kind: str

    def __init__(self, part: str, spec: PartSpec, device: str | torch.device) -> None:
        self.part = part
        self.spec = spec
        self.device = torch.device(device)

    @property
    def name(self) -> str:
        return self.kind

    def _prepare(self, tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if len(tensors) != len(self.spec.inputs):
            names = [s.name for s in self.spec.inputs]
            raise TypeError(f"{self.part} takes {len(names)} tensors {names}, got {len(tensors)}")
        return [torch.as_tensor(x).to(device=self.device, dtype=s.torch_dtype).contiguous()
                for x, s in zip(tensors, self.spec.inputs, strict=True)]

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self._run(*self._prepare(tensors)).float()

    @abstractmethod
    def _run(self, *tensors: torch.Tensor) -> torch.Tensor: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.part} {self.name} on {self.device}>"


class TorchRuntime(Runtime):
    """PyTorch eager, or ``torch.compile`` with ``compile=True`` (compiled lazily on the first call)."""

    def __init__(self, module: nn.Module, spec: PartSpec, device: str | torch.device = "cpu", *,
                 compile: bool = False, compile_mode: str | None = None) -> None:
        super().__init__(spec.name, spec, device)
        self.module = module.to(self.device).eval()
        self.kind = "torch-compile" if compile else "torch"
        if compile:
            if not torch_compile_available(self.device):
                raise RuntimeUnavailable(f"torch.compile is not available on {self.device} here")
            self._fn: Callable[..., torch.Tensor] = torch.compile(self.module, mode=compile_mode)
        else:
            self._fn = self.module

    def _run(self, *tensors: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._fn(*tensors)


class TorchScriptRuntime(Runtime):
    kind = "torchscript"

    def __init__(self, path: str | os.PathLike[str], spec: PartSpec, device: str | torch.device = "cpu") -> None:
        super().__init__(spec.name, spec, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream (torch 2.x)
            self.module = torch.jit.load(str(path), map_location=self.device).eval()

    def _run(self, *tensors: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(*tensors)


class OnnxRuntime(Runtime):
    """onnxruntime with the CUDA execution provider on a CUDA device when installed (onnxruntime-gpu), else CPU.

    Inputs and outputs go through host memory (numpy); outputs are moved back to ``device``.
    """

    kind = "onnx"

    def __init__(self, path: str | os.PathLike[str], spec: PartSpec, device: str | torch.device = "cpu", *,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__(spec.name, spec, device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in available:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.providers = self.session.get_providers()
        self._names = [i.name for i in self.session.get_inputs()]

    @property
    def name(self) -> str:
        return f"onnx[{self.providers[0].removesuffix('ExecutionProvider')}]"

    def _run(self, *tensors: torch.Tensor) -> torch.Tensor:
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self._names, tensors, strict=True)}
        (out,) = self.session.run(None, feeds)
        return torch.from_numpy(out).to(self.device)


def torch_compile_available(device: str | torch.device = "cpu") -> bool:
    """``torch.compile`` needs a C++ compiler on the CPU, and triton on CUDA."""
    dev = torch.device(device)
    if dev.type == "cuda":
        import importlib.util

        return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


# ---------------------------------------------------------------------------------------------- loading


def resolve_model(source: Source) -> nn.Module:
    """A model from a module, a checkpoint folder, an export folder (its ``model/`` or source folder) or a
    registry name (random weights)."""
    if isinstance(source, nn.Module):
        return source.eval()
    path = Path(source)
    if is_export_dir(path):
        if (path / MODEL_DIR / "config.json").exists():
            path = path / MODEL_DIR
        else:
            path = Path(read_metadata(path).source)
            if not (path / "config.json").exists():
                raise RuntimeUnavailable(f"{source}: the export has no {MODEL_DIR}/ and its source {path} is not "
                                         "a checkpoint folder; the torch runtimes need the PyTorch model")
    import models

    if (path / "config.json").exists():
        return models.load_pretrained(path)
    if str(source) in models.list_models():
        from export.inputs import random_weights_model

        return random_weights_model(str(source))  # the random weights the server gives a registry name
    raise FileNotFoundError(f"{source}: not a checkpoint folder, an export folder or a registered name")


def export_cache_key(model: nn.Module, fmt: str, parts: tuple[str, ...], **export_kw: Any) -> str:
    """The content address of an export of ``parts`` of ``model`` in ``fmt``: a sha256 of the model's weights
    (every state-dict tensor's name, dtype, shape and bytes), its class and config, the export options, the
    torch / onnx / onnxruntime versions and the export format version. Same key, same export."""
    from export.exporter import _config_dict, _versions
    from export.metadata import FORMAT_VERSION

    h = hashlib.sha256()
    head = {"class": f"{type(model).__module__}.{type(model).__qualname__}", "config": _config_dict(model),
            "format": fmt, "parts": sorted(parts), "options": {k: repr(v) for k, v in sorted(export_kw.items())},
            "versions": _versions(), "format_version": FORMAT_VERSION}
    h.update(json.dumps(head, sort_keys=True, default=repr).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"\x00{name}:{t.dtype}:{tuple(t.shape)}\x00".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _cached_export(folder: Path, fmt: str, parts: tuple[str, ...]) -> bool:
    """Whether ``folder`` is a complete export holding ``parts`` in ``fmt`` (its files present)."""
    if not is_export_dir(folder):
        return False
    try:
        files = read_metadata(folder).files
    except (ValueError, KeyError, OSError, json.JSONDecodeError):
        return False
    return all(fmt in files.get(p, {}) and (folder / files[p][fmt]).exists() for p in parts)


def ensure_export(source: Source, fmt: str, parts: tuple[str, ...], cache_dir: str | os.PathLike[str] | None,
                  **export_kw: Any) -> Path:
    """An export folder holding ``parts`` in ``fmt`` for ``source``: the source itself if it is one that has
    them; else, with ``cache_dir``, the content-addressed export ``cache_dir/<key>`` (see
    :func:`export_cache_key`): reused when a previous run wrote it, else exported (parity-checked) there;
    without ``cache_dir``, a fresh export into a temporary folder."""
    if not isinstance(source, nn.Module) and is_export_dir(source):
        meta = read_metadata(source)
        missing = [p for p in parts if fmt not in meta.files.get(p, {})]
        if missing:
            raise RuntimeUnavailable(f"{source}: no {fmt} export of {missing}; re-export with --formats {fmt}")
        return Path(source)
    from export.exporter import export_model

    model = resolve_model(source)
    name = str(source) if not isinstance(source, nn.Module) else type(source).__name__
    if cache_dir is None:
        out = Path(tempfile.mkdtemp(prefix="tokserve-export-"))
        log.info("exporting %s (%s: %s) to %s", name, fmt, ", ".join(parts), out)
        export_model(model, out, source=name, formats=(fmt,), parts=parts, **export_kw)
        return out
    out = Path(cache_dir) / export_cache_key(model, fmt, parts, **export_kw)[:24]
    if _cached_export(out, fmt, parts):
        log.info("reusing export %s (%s: %s; same weights, config, options and versions)", out, fmt,
                 ", ".join(parts))
        return out
    log.info("exporting %s (%s: %s) to %s", name, fmt, ", ".join(parts), out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # complete, or not there at all
    try:
        export_model(model, tmp, source=name, formats=(fmt,), parts=parts, **export_kw)
        if out.exists():  # an incomplete folder (older layout, interrupted copy): replace it
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_runtime(kind: str, source: Source, part: str, device: str | torch.device = "cpu", *,
                 cache_dir: str | os.PathLike[str] | None = None, threads: int | None = None,
                 **export_kw: Any) -> Runtime:
    """Load ``part`` (encoder, decoder, denoiser, denoiser_cfg) of ``source`` behind runtime ``kind``."""
    if kind not in RUNTIME_KINDS:
        raise ValueError(f"runtime kind must be one of {RUNTIME_KINDS}, got {kind!r}")
    if kind in ("torch", "torch-compile"):
        module, spec = build_part(resolve_model(source), part)
        return TorchRuntime(module, spec, device, compile=kind == "torch-compile")
    fmt = FORMAT_OF_KIND[kind]
    folder = ensure_export(source, fmt, (part,), cache_dir, **export_kw)
    meta = read_metadata(folder)
    path = folder / meta.files[part][fmt]
    spec = meta.parts[part]
    if kind == "onnx":
        return OnnxRuntime(path, spec, device, threads=threads)
    return TorchScriptRuntime(path, spec, device)


def source_facts(source: Source) -> dict[str, Any]:
    """Model facts (kind, image_size, token_shape, vq_mean/std or latent_shape ...) without loading graphs."""
    if not isinstance(source, nn.Module) and is_export_dir(source):
        return dict(read_metadata(source).facts)
    return model_facts(resolve_model(source))


# ---------------------------------------------------------------------------------------------- wrappers


@dataclass
class TokenizerRuntime:
    """``encode(images (B, 3, H, W)) -> tokens (B, L, D)`` and ``decode(tokens) -> images``, plus the facts
    (``image_size``, ``token_shape``, ``vq_mean``, ``vq_std``) the server needs."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    facts: dict[str, Any] = field(default_factory=dict)
    name: str = "custom"

    @classmethod
    def load(cls, kind: str, source: Source, device: str | torch.device = "cpu", **kw: Any) -> TokenizerRuntime:
        if kind in FORMAT_OF_KIND:  # export both parts once
            source = ensure_export(source, FORMAT_OF_KIND[kind], ("encoder", "decoder"), kw.pop("cache_dir", None),
                                   **{k: v for k, v in kw.items() if k != "threads"})
            kw = {k: v for k, v in kw.items() if k == "threads"}
        elif not isinstance(source, nn.Module):
            source = resolve_model(source)
        enc = load_runtime(kind, source, "encoder", device, **kw)
        dec = load_runtime(kind, source, "decoder", device, **kw)
        return cls(enc, dec, source_facts(source), enc.name)


@dataclass
class DenoiserRuntime:
    """A sampler ``model_fn``: ``self(x (B, L, C), t (B,), y (B,)) -> (B, L, C_out)``; optionally a guided
    variant ``guided(x, t, y, cfg_scale)`` (one forward of batch 2B)."""

    model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    guided: Callable[..., torch.Tensor] | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    name: str = "custom"

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model_fn(x, t, y)

    @classmethod
    def load(cls, kind: str, source: Source, device: str | torch.device = "cpu", *, with_guided: bool = False,
             **kw: Any) -> DenoiserRuntime:
        parts = ("denoiser", "denoiser_cfg") if with_guided else ("denoiser",)
        if kind in FORMAT_OF_KIND:
            source = ensure_export(source, FORMAT_OF_KIND[kind], parts, kw.pop("cache_dir", None),
                                   **{k: v for k, v in kw.items() if k != "threads"})
            kw = {k: v for k, v in kw.items() if k == "threads"}
        elif not isinstance(source, nn.Module):
            source = resolve_model(source)
        den = load_runtime(kind, source, "denoiser", device, **kw)
        guided = load_runtime(kind, source, "denoiser_cfg", device, **kw) if with_guided else None
        return cls(den, guided, source_facts(source), den.name)


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RuntimeChoice:
    """A parsed runtime setting: a default kind and per-model overrides.

    ``"onnx"`` -> every model on onnx; ``"torch,softvq-s-64=onnx,sit-s-64x32=torchscript"`` -> torch by
    default, the two named models on their own runtime.
    """

    default: str = "torch"
    per_model: Mapping[str, str] = field(default_factory=dict)

    def kind_for(self, model_name: str) -> str:
        return self.per_model.get(model_name, self.default)


def parse_runtime_setting(value: str | None) -> RuntimeChoice:
    """Parse ``TOKSERVE_RUNTIME``-style text (see :class:`RuntimeChoice`); empty means ``torch``."""
    default, per_model = "torch", {}
    for item in (value or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, kind = item.rpartition("=")
        kind = kind.strip()
        if kind not in RUNTIME_KINDS:
            raise ValueError(f"unknown runtime {kind!r} in {value!r}; choose from {RUNTIME_KINDS}")
        if sep:
            per_model[name.strip()] = kind
        else:
            default = kind
    return RuntimeChoice(default, per_model)


__all__ = [
    "RUNTIME_ENV",
    "RUNTIME_KINDS",
    "DenoiserRuntime",
    "OnnxRuntime",
    "Runtime",
    "RuntimeChoice",
    "RuntimeUnavailable",
    "TokenizerRuntime",
    "TorchRuntime",
    "TorchScriptRuntime",
    "load_runtime",
    "parse_runtime_setting",
    "resolve_model",
    "source_facts",
    "torch_compile_available",
]
