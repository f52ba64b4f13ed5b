"""``auto``: what it picks per device, dtype and recorded measurement, and the per-batch-size dispatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models
from models.runtime import (
    CPU_TABLE,
    BatchDispatchRunner,
    CpuRecord,
    RunnerConfig,
    auto_dtype,
    auto_plan,
    torch_compile_available,
)


@pytest.fixture(scope="module")
def sit() -> torch.nn.Module:
    return models.create_model("sit-tiny-64x32").eval()


def test_cuda_is_bf16_compile_graphs(sit: torch.nn.Module) -> None:
    plan = auto_plan(sit, "denoiser", "cuda")  # planning needs no GPU
    compiled = torch_compile_available("cuda")
    assert plan.config == RunnerConfig(precision="bf16", compile=compiled, cuda_graphs=True) and plan.onnx is None
    assert auto_plan(sit, "denoiser", "cuda", dtype="float32").config.precision == "fp32"
    assert auto_dtype("cuda") == "bfloat16" and auto_dtype("cpu") == "float32"


def test_cpu_follows_the_recorded_table(sit: torch.nn.Module) -> None:
    n = sum(p.numel() for p in sit.parameters())
    plan = auto_plan(sit, "denoiser", "cpu")
    assert plan.config == RunnerConfig() and plan.onnx is None  # sit-tiny is far from the measured 5.3 M SiT
    table = (CpuRecord("SiT", "denoiser", n, onnx_below=16, source="test"),)
    plan = auto_plan(sit, "denoiser", "cpu", table=table)
    assert plan.onnx == (1, 16) and not plan.onnx_everywhere and "test" in plan.reason
    everywhere = auto_plan(sit, "denoiser", "cpu", table=(CpuRecord("SiT", "denoiser", n),))
    assert everywhere.onnx_everywhere
    # float32 graphs only, and exact serving keeps PyTorch's bit-level behaviour
    assert auto_plan(sit, "denoiser", "cpu", dtype="bfloat16", table=table).onnx is None
    assert auto_plan(sit, "denoiser", "cpu", dtype="bfloat16", table=table).config.precision == "bf16"
    assert auto_plan(sit, "denoiser", "cpu", exact=True, table=table).onnx is None
    assert auto_plan(sit, "decoder", "cpu", table=table).onnx is None  # another part
    assert not CpuRecord("SiT", "denoiser", 4 * n).covers(sit, "denoiser")  # another size


def test_table_covers_the_shipped_models() -> None:
    for folder, parts in (("tokenizer", ("encoder", "decoder")), ("generator", ("denoiser",))):
        m = models.load_pretrained(Path(__file__).resolve().parents[2] / "weights" / "default" / folder)
        for part in parts:
            assert any(r.covers(m, part) for r in CPU_TABLE), (folder, part)


class _Fixed:
    def __init__(self, name: str, value: float) -> None:
        self.name, self.value, self.device, self.dtype, self.part = name, value, torch.device("cpu"), torch.float32, "p"
        self.warmed = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), self.value)

    def warmup(self, buckets=None):  # noqa: ANN001, ANN201
        self.warmed = True

    @property
    def ready(self) -> bool:
        return self.warmed


def test_dispatch_by_batch_size() -> None:
    inner, outer = _Fixed("onnx[CPU]", 1.0), _Fixed("torch-eager", 2.0)
    run = BatchDispatchRunner(inner, outer, 1, 32)
    assert run.name == "onnx[CPU]@1-31,torch-eager"
    assert [float(run(torch.zeros(n, 3))[0]) for n in (1, 31, 32, 100)] == [1.0, 1.0, 2.0, 2.0]
    assert not run.ready
    run.warmup()
    assert run.ready
