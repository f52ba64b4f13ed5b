"""Pure bookkeeping of the runners: bucket choice, chunk plans, the variant grammar."""

from __future__ import annotations

import math

import pytest

from models.runtime import (
    DEFAULT_BUCKETS,
    Chunk,
    RunnerConfig,
    choose_bucket,
    normalize_buckets,
    plan_batches,
)


def test_normalize_sorts_dedups_and_rejects_non_positive() -> None:
    assert normalize_buckets([8, 1, 8, 2]) == (1, 2, 8)
    for bad in ([], [0, 4], [-1]):
        with pytest.raises(ValueError):
            normalize_buckets(bad)


@pytest.mark.parametrize(("n", "expected"), [(1, 1), (2, 2), (3, 4), (5, 8), (64, 64), (65, 128), (129, 256),
                                             (256, 256), (257, 256)])
def test_choose_bucket_is_the_smallest_that_holds_n(n: int, expected: int) -> None:
    assert choose_bucket(n, DEFAULT_BUCKETS) == expected


def test_choose_bucket_rejects_empty_requests() -> None:
    with pytest.raises(ValueError):
        choose_bucket(0, DEFAULT_BUCKETS)
    with pytest.raises(ValueError):
        plan_batches(0, DEFAULT_BUCKETS)


@pytest.mark.parametrize("buckets", [DEFAULT_BUCKETS, (3, 10), (16,), (1, 24, 48, 100)])
def test_plans_cover_every_row_once_with_minimal_buckets(buckets: tuple[int, ...]) -> None:
    largest = max(buckets)
    for n in range(1, 3 * largest + 7):
        plan = plan_batches(n, buckets)
        assert plan[0].start == 0 and plan[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(plan, plan[1:], strict=False))  # contiguous, no overlap
        assert len(plan) == math.ceil(n / largest)
        for c in plan:
            assert 1 <= c.rows <= c.bucket and c.bucket in buckets
            assert c.padding == c.bucket - c.rows
            smaller = [b for b in buckets if b < c.bucket]
            assert not smaller or max(smaller) < c.rows  # no smaller bucket would have held the chunk


def test_plan_example() -> None:
    assert plan_batches(300, (64, 256)) == [Chunk(0, 256, 256), Chunk(256, 300, 64)]


@pytest.mark.parametrize("spec", ["fp32", "tf32", "bf16-autocast", "bf16+graphs", "fp16+compile+graphs",
                                  "bf16+dyn+graphs", "bf16+compile+autotune+graphs", "bf16+cl", "fp32+math"])
def test_variant_grammar_round_trips(spec: str) -> None:
    cfg = RunnerConfig.parse(spec)
    assert RunnerConfig.parse(cfg.label) == cfg
    assert cfg.precision == spec.split("+")[0]
    assert cfg.cuda_graphs == ("graphs" in spec)
    assert cfg.compile == any(f in spec for f in ("compile", "dyn", "autotune"))


def test_variant_grammar_rejects_unknown_flags_and_conflicts() -> None:
    with pytest.raises(ValueError, match="unknown runner flags"):
        RunnerConfig.parse("bf16+turbo")
    with pytest.raises(ValueError, match="precision"):
        RunnerConfig.parse("int8")
    with pytest.raises(ValueError, match="own CUDA graphs"):
        RunnerConfig(compile=True, compile_mode="reduce-overhead", cuda_graphs=True)
    RunnerConfig(compile=True, compile_mode="reduce-overhead", cuda_graphs=False)  # fine without ours


def test_weight_dtypes() -> None:
    import torch

    assert RunnerConfig.parse("bf16").weight_dtype == torch.bfloat16
    assert RunnerConfig.parse("fp16").weight_dtype == torch.float16
    assert RunnerConfig.parse("bf16-autocast").weight_dtype == torch.float32
    assert RunnerConfig.parse("tf32").weight_dtype == torch.float32
