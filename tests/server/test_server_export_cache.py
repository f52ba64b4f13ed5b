"""Reusable exports: with ``TOKSERVE_EXPORT_DIR`` the onnx / torchscript runtimes export into a content-addressed
folder (sha256 of the weights, config, export options and the torch / onnx / onnxruntime versions), so a
restart with unchanged weights loads the previous export ("reusing export <dir>", files untouched) and changed
weights export afresh. Through the server's own loading function (``build_runtimes``), as a start-up runs it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.hub import save_pretrained
from models.registry import create_model
from server.engine.runtime import build_runtimes
from server.engine.specs import resolve_models
from server.settings import Settings


def _start(folder: Path, exports: Path, caplog: pytest.LogCaptureFixture) -> tuple[list[str], torch.Tensor]:
    """What a server start does with ``folder`` (a tokenizer) on onnx: (its export log lines, an encode)."""
    settings = Settings(models=[f"tok={folder}"], runtime="onnx", export_dir=str(exports), torch_threads=1)
    specs = resolve_models(settings.models)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tokserve.export"):
        rt = build_runtimes(list(specs.specs.values()), settings)["tok"]
    images = torch.linspace(-1, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    lines = [r.getMessage() for r in caplog.records if r.name == "tokserve.export"]
    return lines, rt.encode(images)  # type: ignore[attr-defined]


def _files(exports: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in exports.rglob("*") if p.is_file()}


def test_restart_reuses_the_export_and_changed_weights_export_again(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    folder, exports = tmp_path / "tok", tmp_path / "exports"
    torch.manual_seed(0)
    save_pretrained(create_model("softvq-tiny-64"), folder)

    first, out1 = _start(folder, exports, caplog)
    assert any(line.startswith("exporting") for line in first), first
    written = _files(exports)
    assert any(p.suffix == ".onnx" for p in written)

    second, out2 = _start(folder, exports, caplog)  # a restart, same weights
    print("\n" + "\n".join(first + second))
    assert [line for line in second if line.startswith("reusing export")], second
    assert not [line for line in second if line.startswith("exporting")], second
    assert _files(exports) == written  # nothing rewritten
    torch.testing.assert_close(out1, out2)

    weights = next(folder.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    third, _ = _start(folder, exports, caplog)  # new weights: a new export beside the old one
    assert any(line.startswith("exporting") for line in third), third
    folders = [p for p in exports.rglob("export.json")]
    assert len(folders) == 2, folders
