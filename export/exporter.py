"""Export a model's parts to ONNX and TorchScript, then check their parity with the PyTorch model.

Parity cases per part (the graphs are traced at batch 2, so batches 1 and 3 also prove the batch axis is
dynamic): random inputs at batch 1 and 3, and real inputs at batch 4 when available: real images for the
encoder, their tokens for the decoder, and (given a ``tokenizer``) their normalised, noised tokens for the
denoiser parts.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from export.formats import DEFAULT_OPSET, export_onnx, export_torchscript, resolve_exporter
from export.inputs import noised_latents, random_inputs, real_images
from export.metadata import MODEL_DIR, ExportMetadata, file_name
from export.parity import DEFAULT_TOLERANCE, ParityError, ParityResult, check_parity
from export.parts import DEFAULT_PARTS, PartSpec, build_part, model_facts, tokenizer_facts
from export.runtime import input_specs
from models.runtime import ModelRunner, OnnxRunner, TorchScriptRunner

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
EXAMPLE_BATCH = 2
RANDOM_BATCHES = (1, 3)
REAL_BATCH = 4


def cpu_fp32(model: nn.Module) -> nn.Module:
    """``model`` in eval mode if it is all float32 on the CPU, else a float32 CPU copy (the caller's model,
    e.g. a server's bf16 model on a GPU, is left as it is). Exports and parity checks run on the CPU."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return model.eval()
    return copy.deepcopy(model).float().cpu().eval()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for pkg in ("onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _config_dict(model: nn.Module) -> dict[str, Any]:
    try:
        from models.registry import config_to_dict

        return config_to_dict(model)
    except Exception:  # a stand-in module without a dataclass config
        return {"class_name": type(model).__name__}


@dataclass(frozen=True)
class RealTokens:
    """Tokens of real images, (N, L, D), with the facts of the tokenizer that made them (vq_mean, vq_std)."""

    tokens: torch.Tensor
    facts: dict[str, Any]


def encode_real(tokenizer: nn.Module, n: int = REAL_BATCH) -> RealTokens:
    """Encode the first ``n`` real validation images with ``tokenizer`` (PyTorch, CPU)."""
    facts = tokenizer_facts(tokenizer)
    enc, _ = build_part(tokenizer, "encoder")
    with torch.inference_mode():
        tokens = enc(real_images(n, facts["image_size"][0])).clone()
    return RealTokens(tokens, facts)


def parity_cases(model: nn.Module, part: str, spec: PartSpec, facts: dict[str, Any], *,
                 tokenizer: nn.Module | RealTokens | None = None, real: bool = True,
                 seed: int = 0) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """(label, inputs) cases for ``part``: random at batches 1 and 3, plus real when available."""
    cases = [("random", random_inputs(spec, facts, b, seed + b)) for b in RANDOM_BATCHES]
    if not real:
        return cases
    try:
        if facts["kind"] == "tokenizer":
            images = real_images(REAL_BATCH, facts["image_size"][0])
            if part == "encoder":
                cases.append(("real", (images,)))
            else:
                cases.append(("real", (encode_real(model).tokens,)))
        elif tokenizer is not None:
            rt = tokenizer if isinstance(tokenizer, RealTokens) else encode_real(tokenizer)
            if list(rt.tokens.shape[1:]) != list(facts["latent_shape"]):
                log.warning("tokenizer tokens %s do not fit the generator's %s; no real denoiser inputs",
                            list(rt.tokens.shape[1:]), facts["latent_shape"])
                return cases
            args = noised_latents(rt.tokens, facts, rt.facts, seed)
            if part == "denoiser_cfg":
                args = args + (torch.full((rt.tokens.shape[0],), 4.0),)
            cases.append(("real", args))
    except FileNotFoundError as e:
        log.warning("no real inputs for the parity check: %s", e)
    return cases


def open_exported(folder: Path, part: str, fmt: str, spec: PartSpec) -> ModelRunner:
    """The CPU runner of an exported file (the parity check runs what the server runs)."""
    path = folder / file_name(part, fmt)
    runner = OnnxRunner if fmt == "onnx" else TorchScriptRunner
    return runner(path, part, input_specs(spec), "cpu")


def export_model(model: nn.Module, out_dir: str | os.PathLike[str], *, source: str = "",
                 formats: Sequence[str] = FORMATS, parts: Sequence[str] | None = None,
                 opset: int = DEFAULT_OPSET, exporter: str = "auto", check: bool = True,
                 tolerance: float = DEFAULT_TOLERANCE, real: bool = True,
                 tokenizer: nn.Module | RealTokens | None = None, save_model: bool = False,
                 seed: int = 0) -> ExportMetadata:
    """Export ``parts`` of ``model`` in ``formats`` into ``out_dir`` and write ``export.json``.

    With ``check`` (the default) every exported file is compared with the PyTorch model on the CPU; the
    results go into ``export.json``, and :class:`~export.parity.ParityError` is raised (after writing it)
    if any exceeds ``tolerance``. ``save_model`` also writes the model to ``out_dir/model``. ``tokenizer``
    (a model, or :class:`RealTokens` already encoded) gives the denoiser parts real inputs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = cpu_fp32(model)
    facts = model_facts(model)
    parts = tuple(parts) if parts else DEFAULT_PARTS[facts["kind"]]
    unknown_formats = sorted(set(formats) - set(FORMATS))
    if unknown_formats:
        raise ValueError(f"unknown formats {unknown_formats}; choose from {FORMATS}")
    onnx_exporter = resolve_exporter(exporter) if "onnx" in formats else "none"
    meta = ExportMetadata(source=source, model_class=type(model).__name__, model_config=_config_dict(model),
                          facts=facts, parts={}, opset=opset, exporter=onnx_exporter, versions=_versions(),
                          tolerance=tolerance)
    if save_model:
        from models.hub import save_pretrained

        save_pretrained(model, out / MODEL_DIR)
    if check and real and facts["kind"] == "generator" and isinstance(tokenizer, nn.Module):
        try:
            tokenizer = encode_real(tokenizer)  # once for all parts
        except FileNotFoundError as e:
            log.warning("no real inputs for the parity check: %s", e)
            tokenizer = None
    results: list[ParityResult] = []
    for part in parts:
        module, spec = build_part(model, part)
        meta.parts[part] = spec
        example = random_inputs(spec, facts, EXAMPLE_BATCH, seed)
        for fmt in formats:
            path = out / file_name(part, fmt)
            log.info("exporting %s to %s", part, path)
            if fmt == "onnx":
                export_onnx(module, spec, example, path, opset=opset, exporter=onnx_exporter)
            else:
                export_torchscript(module, example, path)
            meta.files.setdefault(part, {})[fmt] = path.name
        if check:
            cases = parity_cases(model, part, spec, facts, tokenizer=tokenizer, real=real, seed=seed)
            for fmt in formats:
                rt = open_exported(out, part, fmt, spec)
                results += check_parity(part, fmt, rt, module, cases, tolerance)
                del rt
    meta.parity = [r.to_dict() for r in results]
    meta.write(out)
    failures = [r for r in results if not r.passed]
    if failures:
        raise ParityError(failures)
    return meta


def check_export_dir(folder: str | os.PathLike[str], model: nn.Module, *, tolerance: float | None = None,
                     real: bool = True, tokenizer: nn.Module | RealTokens | None = None) -> list[ParityResult]:
    """Re-run the parity check of an existing export folder against ``model`` (no exception; see ``passed``)."""
    from export.metadata import read_metadata

    folder = Path(folder)
    meta = read_metadata(folder)
    model = cpu_fp32(model)
    facts = model_facts(model)
    tol = meta.tolerance if tolerance is None else tolerance
    results: list[ParityResult] = []
    for part, files in meta.files.items():
        module, spec = build_part(model, part)
        cases = parity_cases(model, part, spec, facts, tokenizer=tokenizer, real=real)
        for fmt in files:
            results += check_parity(part, fmt, open_exported(folder, part, fmt, spec), module, cases, tol)
    return results
