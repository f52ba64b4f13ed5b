"""Bucketed batch sizes: every call of N rows runs as chunks padded to a bucket size (a CUDA graph, or a
``torch.compile`` specialisation, exists per bucket). Pure bookkeeping, testable anywhere."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def normalize_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique positive bucket sizes; ``ValueError`` when empty or not positive."""
    out = tuple(sorted({int(b) for b in buckets}))
    if not out or out[0] < 1:
        raise ValueError(f"buckets must be positive integers, got {tuple(buckets)}")
    return out


def choose_bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``n`` rows (the largest bucket when none does: callers chunk)."""
    if n < 1:
        raise ValueError(f"need at least one row, got {n}")
    b = normalize_buckets(buckets)
    return next((x for x in b if x >= n), b[-1])


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of a request, run padded to ``bucket`` rows."""

    start: int
    stop: int
    bucket: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def padding(self) -> int:
        return self.bucket - self.rows


def plan_batches(n: int, buckets: Sequence[int]) -> list[Chunk]:
    """Split ``n`` rows into chunks of at most the largest bucket, each padded to its smallest bucket:
    ``plan_batches(300, (64, 256))`` -> rows 0-256 in 256, rows 256-300 in 64."""
    b = normalize_buckets(buckets)
    chunks, start = [], 0
    while start < n:
        rows = min(n - start, b[-1])
        chunks.append(Chunk(start, start + rows, choose_bucket(rows, b)))
        start += rows
    if not chunks:
        raise ValueError(f"need at least one row, got {n}")
    return chunks


__all__ = ["DEFAULT_BUCKETS", "Chunk", "choose_bucket", "normalize_buckets", "plan_batches"]
