"""Writing one part to ONNX or TorchScript.

ONNX: ``torch.onnx.export`` with a dynamic batch axis named ``B`` on every input and output. Two exporters:

* ``legacy`` (TorchScript-based, ``dynamo=False``): works with the base install; deprecated upstream but
  still shipped in torch 2.14.
* ``dynamo`` (``torch.export``-based, the upstream default since torch 2.9): needs the ``onnxscript``
  package, which the base install does not include.

``auto`` picks ``dynamo`` when ``onnxscript`` is importable, else ``legacy``. Graphs over 2 GB are stored with
their weights in one ``<part>.onnx.data`` file beside the ``.onnx`` (protobuf's 2 GB limit).

TorchScript: ``torch.jit.trace`` at the example batch; the batch axis stays symbolic because every wrapper
takes its batch size from the input tensors (the parity check at other batch sizes verifies this).
"""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from export.parts import PartSpec

DEFAULT_OPSET = 18
EXPORTERS = ("auto", "legacy", "dynamo")
_TWO_GB = 2**31 - 1


def resolve_exporter(exporter: str) -> str:
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    has_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if exporter == "auto":
        return "dynamo" if has_onnxscript else "legacy"
    if exporter == "dynamo" and not has_onnxscript:
        raise RuntimeError("the dynamo ONNX exporter needs `onnxscript` (pip install onnxscript); "
                           "use --exporter legacy")
    return exporter


def export_onnx(module: nn.Module, spec: PartSpec, example: Sequence[torch.Tensor], path: str | Path, *,
                opset: int = DEFAULT_OPSET, exporter: str = "auto") -> list[str]:
    """Export ``module`` to ``path``; returns the names of the files written (the graph, maybe its data)."""
    path = Path(path)
    exporter = resolve_exporter(exporter)
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tmp_path = tmp / path.name
        names_in = [s.name for s in spec.inputs]
        names_out = [s.name for s in spec.outputs]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks; parity catches real harm
            if exporter == "legacy":
                axes = {s.name: {i: "B" for i, d in enumerate(s.shape) if d == "B"}
                        for s in spec.inputs + spec.outputs}
                torch.onnx.export(module, tuple(example), str(tmp_path), dynamo=False, opset_version=opset,
                                  input_names=names_in, output_names=names_out, dynamic_axes=axes,
                                  do_constant_folding=True)
            else:
                batch = torch.export.Dim("B", min=1, max=65536)
                shapes = tuple({i: batch for i, d in enumerate(s.shape) if d == "B"} for s in spec.inputs)
                program = torch.onnx.export(module, tuple(example), dynamo=True, opset_version=opset,
                                            input_names=names_in, output_names=names_out,
                                            dynamic_shapes=shapes, optimize=True, verbose=False)
                program.save(str(tmp_path), external_data=_graph_bytes(module) > _TWO_GB // 2)
        return _finalise(tmp, tmp_path, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _graph_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.state_dict().values())


def _finalise(tmp: Path, tmp_path: Path, path: Path) -> list[str]:
    """Move the exported graph next to the other files; consolidate any external data into one file."""
    import onnx

    extra = [p for p in tmp.iterdir() if p != tmp_path]
    data_name = path.name + ".data"
    (path.parent / data_name).unlink(missing_ok=True)
    if not extra:
        shutil.move(str(tmp_path), str(path))
        onnx.checker.check_model(str(path))
        return [path.name]
    model = onnx.load(str(tmp_path), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    del model
    (path.parent / data_name).chmod(path.stat().st_mode & 0o777)  # onnx writes it owner-only
    onnx.checker.check_model(str(path))  # a path, so external data are checked too
    return [path.name, data_name]


def export_torchscript(module: nn.Module, example: Sequence[torch.Tensor], path: str | Path) -> list[str]:
    """Trace ``module`` on ``example`` and save the TorchScript archive at ``path``."""
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, tuple(example), check_trace=False)
        torch.jit.save(traced, str(path))
    return [path.name]
