"""The one runner factory: a model part behind the runner a ``TOKSERVE_RUNTIME`` / ``TOKSERVE_DTYPE`` setting
names, exporting it first when that runner runs an exported file.

    enc = make_runner("exports/softvq-s-64", "encoder", "cpu", runtime="onnx")     # a models.runtime runner
    tokens = enc(images)                                                          # (B, 3, H, W) -> (B, L, D)
    runners = make_runners(tokenizer, ("encoder", "decoder"), "cpu", runtime="torchscript")   # one export
    den = make_runner(generator, "denoiser", "cuda", runtime="auto")               # bf16+compile+graphs there
    v = den(x, t, y)                                                              # a sampler ``model_fn``

The runners themselves (:class:`~models.runtime.ModelRunner`: PyTorch eager / compile / bf16 / CUDA graphs,
TorchScript, ONNX Runtime, and ``auto``'s choice between them) live in :mod:`models.runtime`; this module adds
what only export/ can do: turn a model into an export folder (content-addressed, parity-checked) for the
file runners. ``source`` may be a loaded ``nn.Module``, a checkpoint folder (``config.json`` + safetensors), an
export folder (``export.json``, written by ``python -m export``) or a registry name (random weights; for
tests). TorchScript and ONNX runners built from a model (not an export folder) export it first, with the
parity check, into ``cache_dir`` (a fresh temporary folder by default).

Every runner casts its inputs to the part's declared dtypes (float32 or the compute dtype, int64 for classes)
and device, and returns float32 on the runner's device, so results do not depend on the runner beyond the
parity tolerance (float32) or the reduced-precision tolerance (bf16 / fp16).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from export.metadata import MODEL_DIR, is_export_dir, read_metadata
from export.parts import PartSpec, build_part, model_facts
from models.runtime import (
    TORCH_PARTS,
    BatchDispatchRunner,
    InputSpec,
    ModelRunner,
    OnnxRunner,
    RunnerConfig,
    RuntimeUnavailable,
    TorchScriptRunner,
    auto_dtype,
    auto_plan,
    choose_bucket,
    torch_runner,
)

RUNTIME_KINDS = ("auto", "torch", "torch-compile", "torchscript", "onnx")
FORMAT_OF_KIND = {"torchscript": "torchscript", "onnx": "onnx"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
RUNTIME_ENV = "TOKSERVE_RUNTIME"
log = logging.getLogger("tokserve.export")

Source = nn.Module | str | os.PathLike[str]


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


# ---------------------------------------------------------------------------------------------- the factory


def input_specs(spec: PartSpec) -> tuple[InputSpec, ...]:
    """A part's declared inputs (``"B"`` first) as runner input specs (per-row shape, dtype)."""
    return tuple(InputSpec(tuple(int(d) for d in s.shape[1:]), s.torch_dtype, 0) for s in spec.inputs)


def open_file_runner(kind: str, folder: str | os.PathLike[str], part: str, device: str | torch.device = "cpu", *,
                     threads: int | None = None) -> ModelRunner:
    """The ``onnx`` / ``torchscript`` runner of ``part`` in export folder ``folder``."""
    meta = read_metadata(folder)
    fmt = FORMAT_OF_KIND[kind]
    if fmt not in meta.files.get(part, {}):
        raise RuntimeUnavailable(f"{folder}: no {fmt} export of {part!r}; re-export with --formats {fmt}")
    path = Path(folder) / meta.files[part][fmt]
    specs = input_specs(meta.parts[part])
    if kind == "onnx":
        return OnnxRunner(path, part, specs, device, threads=threads)
    return TorchScriptRunner(path, part, specs, device)


def trim_buckets(config: RunnerConfig, max_batch: int | None) -> RunnerConfig:
    """``config`` with no bucket above the one holding ``max_batch`` rows (no graph is captured for batch
    sizes a server never runs; a larger call is chunked)."""
    if max_batch is None or config.buckets is None:
        return config
    top = choose_bucket(max_batch, config.buckets)
    return config.with_changes(buckets=tuple(b for b in config.buckets if b <= top))


def _torch_part(model: nn.Module, part: str, device: torch.device, config: RunnerConfig, *, pad_class: int,
                copy_module: bool, require_compile: bool, max_batch: int | None = None) -> ModelRunner:
    config = trim_buckets(config, max_batch)
    if part in TORCH_PARTS:
        return torch_runner(model, part, device, config, pad_class=pad_class, copy_module=copy_module,
                            require_compile=require_compile)
    _, spec = build_part(model, part)  # e.g. denoiser_cfg: the guided wrapper around the prepared model
    specs = list(input_specs(spec))
    if specs[0].dtype == torch.float32:  # the latents run in the weight dtype; t, y and cfg_scale as declared
        specs[0] = InputSpec(specs[0].row_shape, config.weight_dtype)
    return torch_runner(model, part, device, config, copy_module=copy_module, require_compile=require_compile,
                        fn=lambda m: build_part(m, part)[0], specs=specs)


def make_runner(source: Source, part: str, device: str | torch.device = "cpu", *, runtime: str = "torch",
                dtype: str | torch.dtype = "float32", config: RunnerConfig | str | None = None,
                cache_dir: str | os.PathLike[str] | None = None, threads: int | None = None, exact: bool = False,
                pad_class: int = 0, copy_module: bool = False, max_batch: int | None = None,
                export_folder: str | os.PathLike[str] | None = None, **export_kw: Any) -> ModelRunner:
    """``part`` (encoder, decoder, denoiser, denoiser_cfg) of ``source`` behind ``runtime``:

    * ``torch``: eager PyTorch in ``dtype`` (``float32``, ``bfloat16``, ``float16``, ``auto``);
    * ``torch-compile``: the same under ``torch.compile`` (:class:`RuntimeUnavailable` where it cannot run);
    * ``torchscript`` / ``onnx``: the exported float32 graph (exported into ``cache_dir`` when ``source`` is not
      an export folder holding it);
    * ``auto``: :func:`models.runtime.auto_plan` (``exact`` keeps eager PyTorch on the CPU);

    or, with ``config`` (a :class:`RunnerConfig` or a variant string such as ``bf16+compile+graphs``), exactly
    that PyTorch runner (the benchmarks' variants). A module ``source`` is prepared in place (moved, cast)
    unless ``copy_module``. ``max_batch``: the most rows a call will have (bucketed runners capture no larger
    bucket); ``pad_class``: the class of a denoiser's padding rows; ``export_folder``: an ONNX export of the
    part ``auto`` may use instead of exporting (:func:`make_runners` exports all parts once).
    """
    dev = torch.device(device)
    tkw: dict[str, Any] = {"pad_class": pad_class, "copy_module": copy_module, "max_batch": max_batch}
    if config is not None:
        cfg = RunnerConfig.parse(config) if isinstance(config, str) else config
        return _torch_part(resolve_model(source), part, dev, cfg, require_compile=False, **tkw)
    if runtime not in RUNTIME_KINDS:
        raise ValueError(f"runtime kind must be one of {RUNTIME_KINDS}, got {runtime!r}")
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if runtime in FORMAT_OF_KIND:
        if dtype not in ("float32", "auto") or (dtype == "auto" and auto_dtype(dev) != "float32"):
            log.warning("%s runs the float32 export; TOKSERVE_DTYPE=%s does not apply to it", runtime, dtype)
        folder = ensure_export(source, FORMAT_OF_KIND[runtime], (part,), cache_dir, **export_kw)
        return open_file_runner(runtime, folder, part, dev, threads=threads)
    model = resolve_model(source)
    if runtime == "auto":
        plan = auto_plan(model, part, dev, dtype=dtype, exact=exact)
        log.info("auto runtime for %s %s on %s: %s", type(model).__name__, part, dev, plan.reason)
        eager = None
        if not plan.onnx_everywhere:
            eager = _torch_part(model, part, dev, plan.config, require_compile=False, **tkw)
        if plan.onnx is None:
            assert eager is not None
            return eager
        try:
            folder = export_folder or ensure_export(model, "onnx", (part,), cache_dir, **export_kw)
            onnx = open_file_runner("onnx", folder, part, dev, threads=threads)
        except Exception as e:  # noqa: BLE001 - no onnx, a failed export or parity check: stay on PyTorch
            log.warning("auto runtime for %s %s: ONNX Runtime unavailable (%s: %s); running PyTorch",
                        type(model).__name__, part, type(e).__name__, e)
            return eager or _torch_part(model, part, dev, plan.config, require_compile=False, **tkw)
        if eager is None:
            return onnx
        return BatchDispatchRunner(onnx, eager, *plan.onnx)
    dtype = auto_dtype(dev) if dtype == "auto" else dtype
    cfg = RunnerConfig.for_dtype(dtype, compile=runtime == "torch-compile")
    return _torch_part(model, part, dev, cfg, require_compile=runtime == "torch-compile", **tkw)


_RUNNER_KW = ("dtype", "config", "threads", "exact", "pad_class", "copy_module", "max_batch", "export_folder")


def make_runners(source: Source, parts: Sequence[str], device: str | torch.device = "cpu", *,
                 runtime: str = "torch", cache_dir: str | os.PathLike[str] | None = None,
                 **kw: Any) -> dict[str, ModelRunner]:
    """:func:`make_runner` for several parts of one model (a tokenizer's encoder and decoder), exporting them
    together once for a file runtime."""
    if runtime in FORMAT_OF_KIND and kw.get("config") is None:
        source = ensure_export(source, FORMAT_OF_KIND[runtime], tuple(parts), cache_dir,
                               **{k: v for k, v in kw.items() if k not in _RUNNER_KW})
    elif not isinstance(source, nn.Module):
        source = resolve_model(source)
    if runtime == "auto" and kw.get("config") is None and isinstance(source, nn.Module):
        plans = {p: auto_plan(source, p, device, dtype=str(kw.get("dtype", "float32")).removeprefix("torch."),
                              exact=bool(kw.get("exact", False))) for p in parts}
        onnx_parts = tuple(p for p in parts if plans[p].onnx is not None)
        if len(onnx_parts) > 1:
            try:
                kw["export_folder"] = ensure_export(source, "onnx", onnx_parts, cache_dir,
                                                    **{k: v for k, v in kw.items() if k not in _RUNNER_KW})
            except Exception as e:  # noqa: BLE001 - each part then tries alone, and falls back to PyTorch
                log.warning("auto runtime: exporting %s failed (%s: %s)", ", ".join(onnx_parts), type(e).__name__, e)
    return {p: make_runner(source, p, device, runtime=runtime, cache_dir=cache_dir, **kw) for p in parts}


def source_facts(source: Source) -> dict[str, Any]:
    """Model facts (kind, image_size, token_shape, vq_mean/std or latent_shape ...) without loading graphs."""
    if not isinstance(source, nn.Module) and is_export_dir(source):
        return dict(read_metadata(source).facts)
    return model_facts(resolve_model(source))


# ---------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RuntimeChoice:
    """A parsed runtime setting: a default kind and per-model overrides.

    ``"onnx"`` -> every model on onnx; ``"torch,softvq-s-64=onnx,sit-s-64x32=torchscript"`` -> torch by
    default, the two named models on their own runtime.
    """

    default: str = "auto"
    per_model: Mapping[str, str] = field(default_factory=dict)

    def kind_for(self, model_name: str) -> str:
        return self.per_model.get(model_name, self.default)


def parse_runtime_setting(value: str | None) -> RuntimeChoice:
    """Parse ``TOKSERVE_RUNTIME``-style text (see :class:`RuntimeChoice`); empty means ``auto``."""
    default, per_model = "auto", {}
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
    "DTYPES",
    "RUNTIME_ENV",
    "RUNTIME_KINDS",
    "RuntimeChoice",
    "RuntimeUnavailable",
    "ensure_export",
    "export_cache_key",
    "input_specs",
    "make_runner",
    "make_runners",
    "open_file_runner",
    "trim_buckets",
    "parse_runtime_setting",
    "resolve_model",
    "source_facts",
]
