"""Runners over exported graph files: TorchScript (``torch.jit.load``) and ONNX Runtime.

They run a file written by ``python -m export`` (or by the factory ``export.runtime.make_runner``, which
exports on demand); building and parity-checking the file is export's job, running it is this module's, so
models/ never imports export/. Inputs are cast to the part's declared dtypes (float32, int64 for classes)
and device; the output is float32 on the runner's device.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Sequence

import torch

from models.runtime.base import InputSpec, RuntimeUnavailable, WarmupReport, cast_inputs, float_output


class _FileRunner:
    """Shared bookkeeping of the file runners: specs, device, readiness, warm-up on dummy rows."""

    dtype = torch.float32

    def __init__(self, part: str, specs: Sequence[InputSpec], device: torch.device | str) -> None:
        self.part = part
        self.specs = tuple(specs)
        self.device = torch.device(device)
        self._ready = threading.Event()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def mode(self) -> str:
        return "graph-file"

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        return float_output(self._run(*cast_inputs(self.part, tensors, self.specs, self.device, torch.float32)))

    def _run(self, *tensors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def warmup(self, buckets: Sequence[int] | None = None) -> WarmupReport:
        """One call of padding-valued rows per size in ``buckets`` (default: 1); sets :attr:`ready`."""
        sizes = tuple(sorted(set(buckets or (1,))))
        report = WarmupReport(self.part, self.mode, sizes, compile="n/a")
        t0 = time.perf_counter()
        for b in sizes:
            tb = time.perf_counter()
            self(*(torch.full((b, *s.row_shape), s.pad_value, dtype=s.dtype) for s in self.specs))
            report.seconds[b] = time.perf_counter() - tb
        report.total_s = time.perf_counter() - t0
        report.finished_at = time.time()
        self._ready.set()
        return report

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.part} {self.name} on {self.device}>"  # type: ignore[attr-defined]


class TorchScriptRunner(_FileRunner):
    """A TorchScript file (``torch.jit.load``) on ``device``."""

    name = "torchscript"

    def __init__(self, path: str | os.PathLike[str], part: str, specs: Sequence[InputSpec],
                 device: torch.device | str = "cpu") -> None:
        super().__init__(part, specs, device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream (torch 2.x)
            self.module = torch.jit.load(str(path), map_location=self.device).eval()

    def _run(self, *tensors: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(*tensors)


class OnnxRunner(_FileRunner):
    """onnxruntime with the CUDA execution provider on a CUDA device when installed (onnxruntime-gpu), else CPU.

    Inputs and outputs go through host memory (numpy); outputs are moved back to ``device``. ``threads``:
    intra-op threads (default: onnxruntime's).
    """

    def __init__(self, path: str | os.PathLike[str], part: str, specs: Sequence[InputSpec],
                 device: torch.device | str = "cpu", *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeUnavailable("onnxruntime is not installed") from e

        super().__init__(part, specs, device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers: list[str | tuple[str, dict[str, int]]] = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in available:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.providers = self.session.get_providers()
        self._names = [i.name for i in self.session.get_inputs()]

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"onnx[{self.providers[0].removesuffix('ExecutionProvider')}]"

    def _run(self, *tensors: torch.Tensor) -> torch.Tensor:
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self._names, tensors, strict=True)}
        (out,) = self.session.run(None, feeds)
        return torch.from_numpy(out).to(self.device)


__all__ = ["OnnxRunner", "TorchScriptRunner"]
