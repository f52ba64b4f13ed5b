"""The PyTorch runners of models.runtime on the CPU: bucketing (eager fallback, same padding as on CUDA),
reduced precision, compile fallback, the denoiser and tokenizer parts."""

from __future__ import annotations

import copy

import pytest
import torch

import models
from bench.common import enliven_
from models.dit import TimestepEmbedder
from models.runtime import (
    CachedTimestepEmbedder,
    GuardedCompile,
    InputSpec,
    RunnerConfig,
    TorchRunner,
    compile_fn,
    plan_batches,
    torch_runner,
)


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-6) -> None:
    """|out - ref| <= tol * max(1, max |ref|) everywhere (fp32 round-off of a different matmul shape)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = max(1.0, float(ref.abs().max()))
    assert float((out - ref).abs().max()) <= tol * scale


@pytest.fixture(scope="module")
def sit() -> torch.nn.Module:
    torch.manual_seed(0)
    return enliven_(models.create_model("sit-tiny-64x32").eval(), seed=0)


@pytest.fixture(scope="module")
def dit() -> torch.nn.Module:
    torch.manual_seed(0)
    return enliven_(models.create_model("dit-tiny-64x32").eval(), seed=1)


class _Tokenizer:
    """A tokenizer's encoder and decoder runners over one prepared module (as the server builds them)."""

    def __init__(self, tok: torch.nn.Module, device: object, cfg: RunnerConfig, copy_module: bool = False) -> None:
        self.module = copy.deepcopy(tok) if copy_module else tok
        self.encoder = torch_runner(self.module, "encoder", device, cfg)
        self.decoder = torch_runner(self.module, "decoder", device, cfg)
        self.encode, self.decode = self.encoder, self.decoder

    def warmup(self) -> None:
        self.encoder.warmup()
        self.decoder.warmup()

    @property
    def ready(self) -> bool:
        return self.encoder.ready and self.decoder.ready


def _inputs(n: int, seed: int = 0, num_classes: int = 1000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 64, 32, generator=g), torch.rand(n, generator=g),
            torch.randint(0, num_classes + 1, (n,), generator=g))


# ------------------------------------------------------------------------------------------- the runner


class Recorder:
    """fn(x (B, 2), y (B,)) -> x * 10 + y, remembering every batch it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.clone(), y.clone()))
        return x * 10 + y[:, None]


def _runner(fn: Recorder, buckets: tuple[int, ...] = (2, 4, 8)) -> TorchRunner:
    specs = (InputSpec((2,), torch.float32, -1.0), InputSpec((), torch.long, 7))
    return TorchRunner(fn, specs, device="cpu", buckets=buckets, graphs=True, part="toy")


def test_padding_rows_hold_the_dummy_values_and_outputs_are_sliced() -> None:
    fn = Recorder()
    run = _runner(fn)
    x, y = torch.arange(10.0).reshape(5, 2), torch.tensor([0, 1, 2, 3, 4])
    out = run(x, y)
    assert torch.equal(out, x * 10 + y[:, None])
    (bx, by), = fn.seen
    assert bx.shape == (8, 2) and torch.equal(bx[:5], x) and bool((bx[5:] == -1).all())
    assert torch.equal(by[:5], y) and bool((by[5:] == 7).all())
    assert (run.stats.rows, run.stats.padded_rows, run.stats.eager_runs, run.stats.replays) == (5, 3, 1, 0)
    assert run.mode == "eager" and not run.use_graphs  # no CUDA here: same bookkeeping, eagerly


def test_stale_rows_of_a_larger_call_are_re_padded() -> None:
    fn = Recorder()
    run = _runner(fn)
    run(torch.ones(4, 2), torch.ones(4, dtype=torch.long))
    run(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    bx, by = fn.seen[-1]
    assert bx.shape == (4, 2) and bool((bx[3] == -1).all()) and int(by[3]) == 7


def test_requests_over_the_largest_bucket_are_chunked() -> None:
    fn = Recorder()
    run = _runner(fn)
    x, y = torch.randn(19, 2), torch.randint(0, 5, (19,))
    out = run(x, y)
    assert torch.equal(out, x * 10 + y[:, None])
    assert [b[0].shape[0] for b in fn.seen] == [8, 8, 4]
    assert run.stats.padded_rows == 1


def test_output_is_a_copy_not_the_static_buffer() -> None:
    run = _runner(Recorder())
    a = run(torch.ones(2, 2), torch.zeros(2, dtype=torch.long))
    b = run(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    assert bool((a == 10).all()) and bool((b == 0).all())


def test_input_validation() -> None:
    run = _runner(Recorder())
    with pytest.raises(ValueError):
        run(torch.ones(3, 3), torch.ones(3, dtype=torch.long))  # wrong row shape
    with pytest.raises(ValueError):
        run(torch.ones(3, 2), torch.ones(2, dtype=torch.long))  # row counts differ
    with pytest.raises(TypeError):
        run(torch.ones(3, 2))


def test_warmup_reports_and_sets_ready() -> None:
    fn = Recorder()
    run = _runner(fn)
    assert not run.ready and not run.wait_ready(0.0)
    report = run.warmup([2, 8])
    assert run.ready and run.wait_ready(0.0)
    assert report.mode == "eager" and report.buckets == (2, 8) and set(report.seconds) == {2, 8}
    assert [b[0].shape[0] for b in fn.seen] == [8, 2]  # largest first
    assert bool((fn.seen[0][1] == 7).all())  # warm-up runs on valid dummy rows
    with pytest.raises(ValueError, match="not among"):
        run.warmup([3])


# ---------------------------------------------------------------------------------------- the denoiser


@pytest.mark.parametrize("n", [1, 3, 5, 8, 11])
def test_denoiser_fallback_equals_the_plain_model(sit: torch.nn.Module, n: int) -> None:
    den = torch_runner(sit, "denoiser", "cpu", RunnerConfig.parse("fp32+graphs", buckets=(1, 2, 4, 8)), copy_module=True)
    den.warmup()
    x, t, y = _inputs(n, seed=n)
    with torch.no_grad():
        ref = sit(x, t, y)
    _close(den(x, t, y), ref)
    assert den.stats.rows == n and den.stats.padded_rows == sum(c.padding for c in plan_batches(n, den.buckets))


def test_padding_does_not_change_real_rows(sit: torch.nn.Module) -> None:
    """The same 3 rows, run padded into bucket 8 and unpadded into bucket 3, agree to 1e-6."""
    x, t, y = _inputs(3, seed=5)
    padded = torch_runner(sit, "denoiser", "cpu", RunnerConfig(precision="fp32", buckets=(8,)), copy_module=True)
    exact = torch_runner(sit, "denoiser", "cpu", RunnerConfig(precision="fp32", buckets=(3,)), copy_module=True)
    _close(padded(x, t, y), exact(x, t, y))
    assert padded.stats.padded_rows == 5 and exact.stats.padded_rows == 0


def test_dit_learned_sigma_output_and_pad_class(dit: torch.nn.Module) -> None:
    cfg = RunnerConfig(precision="fp32", buckets=(4,))
    den = torch_runner(dit, "denoiser", "cpu", cfg, pad_class=1000, copy_module=True)
    assert den.buffers(4)[2].tolist() == [1000] * 4
    x, t, y = _inputs(3, seed=2)
    t = t * 999
    with torch.no_grad():
        ref = dit(x, t, y)
    out = den(x, t, y)
    assert out.shape == (3, 64, 64)
    _close(out, ref)
    with pytest.raises(ValueError, match="pad_class"):
        torch_runner(dit, "denoiser", "cpu", cfg, pad_class=1001, copy_module=True)


def test_reduced_precision_keeps_time_embedding_fp32(sit: torch.nn.Module) -> None:
    x, t, y = _inputs(4, seed=3)
    with torch.no_grad():
        ref = sit(x, t, y)
    for spec in ("bf16", "fp16", "bf16-autocast"):
        den = torch_runner(sit, "denoiser", "cpu", RunnerConfig.parse(spec), copy_module=True)
        m = den.module
        assert m.t_embedder.mlp[0].weight.dtype == torch.float32
        if isinstance(m.t_embedder, CachedTimestepEmbedder):  # graph-safe only with graphs
            assert m.t_embedder.freqs.dtype == torch.float32
        want = torch.float32 if spec == "bf16-autocast" else RunnerConfig.parse(spec).weight_dtype
        assert m.blocks[0].attn.qkv.weight.dtype == want
        assert den.buffers(4)[0].dtype == want and den.buffers(4)[1].dtype == torch.float32
        out = den(x, t, y)
        assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
        rel = float((out - ref).norm() / ref.norm())
        assert rel < 3e-2, (spec, rel)
    assert isinstance(sit.t_embedder, TimestepEmbedder)  # copy_module left the original alone


def test_cached_time_embedder_is_exact_and_keeps_keys() -> None:
    torch.manual_seed(0)
    orig = TimestepEmbedder(48, cast_to_input_dtype=True)
    cached = CachedTimestepEmbedder(copy.deepcopy(orig))
    t = torch.rand(7)
    assert torch.equal(cached(t), orig(t))
    assert cached.state_dict().keys() == orig.state_dict().keys()
    cached.to(torch.bfloat16)
    assert cached.freqs.dtype == torch.float32  # a model-wide cast does not round the frequencies


def test_prepared_model_keeps_its_state_dict_keys(sit: torch.nn.Module) -> None:
    den = torch_runner(sit, "denoiser", "cpu", RunnerConfig.parse("bf16"), copy_module=True)
    assert den.module.state_dict().keys() == sit.state_dict().keys()


# ---------------------------------------------------------------------------------------- the tokenizer


def test_fast_tokenizer_fp32_equals_the_model() -> None:
    torch.manual_seed(0)
    tok = enliven_(models.create_model("softvq-tiny-64").eval(), seed=2)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref_tokens = tok.encode(images)
        ref_images = tok.decode(ref_tokens)
    for spec in ("fp32+graphs", "fp32+cl"):
        fast = _Tokenizer(tok, "cpu", RunnerConfig.parse(spec, buckets=(2, 4)), copy_module=True)
        fast.warmup()
        assert fast.ready
        _close(fast.encode(images), ref_tokens)
        _close(fast.decode(ref_tokens), ref_images)
    bf = _Tokenizer(tok, "cpu", RunnerConfig.parse("bf16"), copy_module=True)
    assert bf.module.quantize.embedding.dtype == torch.float32  # the soft quantizer stays fp32
    tokens = bf.encode(images)
    assert tokens.dtype == torch.float32
    assert float((tokens - ref_tokens).norm() / ref_tokens.norm()) < 3e-2


# ---------------------------------------------------------------------------------------- compilation


def test_compile_failure_falls_back_to_eager() -> None:
    def broken(*_a: object) -> torch.Tensor:
        raise RuntimeError("no compiler here\nmore")

    guarded = GuardedCompile(broken, lambda x: x + 1)
    assert guarded(torch.ones(1)).item() == 2.0
    assert not guarded.active and guarded.error == "RuntimeError: no compiler here"
    assert guarded(torch.ones(1)).item() == 2.0


def test_compile_skipped_cleanly_where_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    fn = lambda x: x * 2  # noqa: E731
    same, note = compile_fn(fn, RunnerConfig(compile=False))
    assert same is fn and note == "eager"

    def refuse(*_a: object, **_k: object) -> None:
        raise RuntimeError("Windows not yet supported for torch.compile")

    monkeypatch.setattr(torch, "compile", refuse)
    same, note = compile_fn(fn, RunnerConfig(compile=True, cuda_graphs=False))
    assert same is fn and note.startswith("eager (torch.compile failed")
    monkeypatch.delattr(torch, "compile")
    same, note = compile_fn(fn, RunnerConfig(compile=True, cuda_graphs=False))
    assert same is fn and "unavailable" in note


def test_denoiser_is_a_sampler_model_fn(sit: torch.nn.Module) -> None:
    """Through the step sampler, the fallback runner gives the plain model's latents."""
    from models.sampling import SampleRequest, get_sampler, run_to_completion

    reqs = [SampleRequest(class_id=c, seed=s, steps=6, cfg_scale=1.75, guidance_high=0.7, sampler="sde")
            for c, s in ((1, 0), (2, 1), (999, 2))]
    den = torch_runner(sit, "denoiser", "cpu", RunnerConfig(precision="fp32", buckets=(2, 4, 8)), copy_module=True)
    with torch.no_grad():
        ref = run_to_completion(get_sampler("sde", sit), sit, reqs, (64, 32))
    out = run_to_completion(get_sampler("sde", sit), den, reqs, (64, 32))
    _close(out, ref, 1e-5)
    assert isinstance(den, TorchRunner)
