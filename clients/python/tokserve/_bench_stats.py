"""Per-request records of a load test and their summary (throughput, percentiles, errors)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestRecord:
    """One measured request.

    ``start`` is when the request was due (open loop: its scheduled arrival, so client lag counts as
    latency) and ``end`` when its answer was read, both ``time.perf_counter()`` seconds. ``status`` is the
    HTTP status (200 for success), or ``"connection"`` / ``"timeout"`` (no response), or ``"dropped"`` (open
    loop: too many requests in flight on the client). Server timings are milliseconds from the headers.
    """

    op: str
    start: float
    end: float
    status: int | str
    images: int = 0
    queue_ms: float | None = None
    compute_ms: float | None = None
    total_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def latency_s(self) -> float:
        return self.end - self.start


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """``{"p50", "p90", "p99", "max", "mean", "count"}`` of ``values`` (``None`` entries when empty)."""
    if len(values) == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None, "count": 0}
    arr = np.asarray(values, dtype=np.float64)
    out: dict[str, float | None] = {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}
    out["max"] = float(arr.max())
    out["mean"] = float(arr.mean())
    out["count"] = int(arr.size)
    return out


def summarise(
    records: Sequence[RequestRecord], *, started: float, label: dict[str, Any] | None = None
) -> dict:
    """Summary of one measured phase that began at ``started`` (``perf_counter`` seconds).

    Throughput counts successful requests over the wall time from ``started`` to the last answer; latency
    percentiles are over successful requests (errors are counted by status instead, so fast rejections do
    not flatter the percentiles).
    """
    end = max((r.end for r in records), default=started)
    wall = max(end - started, 1e-9)
    summary: dict[str, Any] = dict(label or {})
    summary.update(_op_summary(records, wall))  # the whole run's stats are those of all its operations together
    summary["duration_s"] = wall
    summary["by_op"] = {op: _op_summary([r for r in records if r.op == op], wall)
                        for op in sorted({r.op for r in records})}
    return summary


def _op_summary(mine: Sequence[RequestRecord], wall: float) -> dict[str, Any]:
    """The stats of one operation's requests, over the run's whole wall time (so the operations' throughputs
    add up to the run's), with its own sorted latencies for the per-operation plot."""
    mine_ok = [r for r in mine if r.ok]
    errors = Counter(str(r.status) for r in mine if not r.ok)
    return {
        "requests": len(mine),
        "ok": len(mine_ok),
        "error_rate": (len(mine) - len(mine_ok)) / len(mine) if mine else 0.0,
        "errors": dict(sorted(errors.items())),
        "throughput_rps": len(mine_ok) / wall,
        "images_per_s": sum(r.images for r in mine_ok) / wall,
        "latency_ms": distribution([r.latency_s * 1e3 for r in mine_ok]),
        "queue_ms": distribution([r.queue_ms for r in mine_ok if r.queue_ms is not None]),
        "compute_ms": distribution([r.compute_ms for r in mine_ok if r.compute_ms is not None]),
        "server_total_ms": distribution([r.total_ms for r in mine_ok if r.total_ms is not None]),
        "latencies_ms": sorted(r.latency_s * 1e3 for r in mine_ok),
    }


def format_table(summaries: Sequence[dict], *, by_op: bool = False) -> str:
    """A plain-text table of summaries, one line each; with ``by_op``, one more line per operation under
    each run (``  encode`` ...), when the run mixed several."""
    head = (
        f"{'run':<18}{'req':>6}{'ok':>6}{'req/s':>9}{'img/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
        f"{'max ms':>9}{'queue ms':>10}{'compute':>9}  errors"
    )
    lines = [head, "-" * len(head)]
    for s in summaries:
        lines.append(_row(_run_name(s), s))
        ops = s.get("by_op") or {}
        if by_op and len(ops) > 1:
            lines += [_row(f"  {op}", ops[op]) for op in sorted(ops, key=op_order)]
    return "\n".join(lines)


OP_ORDER = ("encode", "decode", "generate")


def op_order(op: str) -> tuple[int, str]:
    return (OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER), op)


def _row(name: str, s: dict) -> str:
    lat, q, c = s["latency_ms"], s["queue_ms"], s["compute_ms"]
    errs = ", ".join(f"{k}: {v}" for k, v in s.get("errors", {}).items()) or "-"
    return (
        f"{name:<18}{s['requests']:>6}{s['ok']:>6}{s['throughput_rps']:>9.2f}{s['images_per_s']:>9.2f}"
        f"{_f(lat['p50'])}{_f(lat['p90'])}{_f(lat['p99'])}{_f(lat['max'])}{_f(q['mean'], 10)}"
        f"{_f(c['mean'])}  {errs}"
    )


def _run_name(s: dict) -> str:
    if s.get("mode") == "closed":
        return f"closed c={s.get('concurrency')}"
    if s.get("rate") is not None:
        return f"open {s['rate']:.3g}/s"
    return str(s.get("mode", "run"))


def _f(value: float | None, width: int = 9) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"
