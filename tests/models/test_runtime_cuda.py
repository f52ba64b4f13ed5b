"""CUDA graphs and compilation on a real GPU (marked ``gpu``: CI deselects them; the GPU session runs
``pytest -m gpu tests/models/test_runtime_cuda.py``). Tiny models, so the whole file takes well under a minute there."""

from __future__ import annotations

import pytest
import torch
from test_runtime_torch import _Tokenizer  # the encoder + decoder runner pair, as the CPU tests build it

import models
from bench.common import enliven_
from models.runtime import RunnerConfig, precision_context, torch_runner

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = torch.device("cuda")


def _sit() -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(DEV):
        return enliven_(models.create_model("sit-tiny-64x32").eval())


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(n, 64, 32, generator=g, device=DEV), torch.rand(n, generator=g, device=DEV),
            torch.randint(0, 1001, (n,), generator=g, device=DEV))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "bf16-autocast"])
def test_graph_replay_equals_eager_with_the_same_buckets(precision: str) -> None:
    sit = _sit()
    cfg = RunnerConfig(precision=precision, buckets=(1, 4, 16), cuda_graphs=True)
    graphs = torch_runner(sit, "denoiser", DEV, cfg, copy_module=True)
    eager = torch_runner(sit, "denoiser", DEV, RunnerConfig(precision=precision, buckets=(1, 4, 16), cuda_graphs=False), copy_module=True)
    tol = 1e-5 if precision == "fp32" else 2e-2  # same kernels expected; allow another cuBLAS algorithm
    report = graphs.warmup()
    assert graphs.ready and report.mode == "cuda-graphs" and graphs.captured == (1, 4, 16)
    for n in (1, 3, 16, 21):
        x, t, y = _inputs(n, seed=n)
        a, b = graphs(x, t, y), eager(x, t, y)
        assert a.dtype == torch.float32 and bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert graphs.stats.eager_runs == 0 and graphs.stats.replays == 5  # 1, 3->4, 16, 21 = 16 + 5->16


def test_fp32_graphs_match_the_plain_model() -> None:
    sit = _sit()
    den = torch_runner(sit, "denoiser", DEV, RunnerConfig(precision="fp32", cuda_graphs=True), copy_module=True)
    den.warmup([8])
    x, t, y = _inputs(5)
    with torch.no_grad(), precision_context("fp32", DEV):
        ref = sit(x, t, y)
    torch.testing.assert_close(den(x, t, y), ref, rtol=1e-5, atol=1e-5)


def test_compiled_graphs_match_eager() -> None:
    sit = _sit()
    x, t, y = _inputs(6)
    eager = torch_runner(sit, "denoiser", DEV, RunnerConfig(precision="bf16", cuda_graphs=False), copy_module=True)
    comp = torch_runner(sit, "denoiser", DEV, RunnerConfig.parse("bf16+compile+graphs", buckets=(8,)), copy_module=True)
    comp.warmup()
    assert comp.fn.error is None, comp.fn.error  # compiled for real, no fallback
    out, ref = comp(x, t, y), eager(x, t, y)
    assert float((out - ref).norm() / ref.norm()) < 2e-2


def test_tokenizer_graphs_match_eager() -> None:
    torch.manual_seed(0)
    with torch.device(DEV):
        tok = enliven_(models.create_model("softvq-tiny-64").eval())
    images = torch.rand(3, 3, 64, 64, device=DEV) * 2 - 1
    for spec in ("fp32+graphs", "bf16+cl+graphs"):
        fast = _Tokenizer(tok, DEV, RunnerConfig.parse(spec, buckets=(4,)), copy_module=True)
        plain = _Tokenizer(tok, DEV, RunnerConfig.parse(spec.replace("+graphs", ""), buckets=(4,)), copy_module=True)
        fast.warmup()
        assert fast.ready and fast.encoder.captured == (4,)
        torch.testing.assert_close(fast.encode(images), plain.encode(images), rtol=1e-5, atol=1e-5)
        z = plain.encode(images)
        torch.testing.assert_close(fast.decode(z), plain.decode(z), rtol=1e-5, atol=1e-5)


def test_step_sampler_on_graphs() -> None:
    from models.sampling import FlowSampler, SampleRequest, run_to_completion

    sit = _sit()
    den = torch_runner(sit, "denoiser", DEV, RunnerConfig(precision="fp32", buckets=(2, 4, 8)), copy_module=True)
    den.warmup()
    reqs = [SampleRequest(class_id=i, seed=i, steps=8, cfg_scale=1.75, guidance_high=0.7, path_type="cosine")
            for i in range(3)]
    with torch.no_grad(), precision_context("fp32", DEV):
        ref = run_to_completion(FlowSampler("sde", device=DEV), sit, reqs, (64, 32))
    out = run_to_completion(FlowSampler("sde", device=DEV), den, reqs, (64, 32))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
