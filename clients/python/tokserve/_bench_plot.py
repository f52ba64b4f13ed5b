"""The load test's PNG, per operation: encode, decode and generate differ by orders of magnitude in latency, so
one merged curve would describe none of them.

Left: p50 / p90 / p99 latency of each operation against that operation's throughput (one point per run,
joined in offered-load order). Middle: the latency distribution (empirical CDF) of each operation. Right: the
throughput of each operation in each run. Colours name operations everywhere; latency axes are logarithmic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ._bench_stats import op_order

PERCENTILE_STYLES = (("p50", "o-"), ("p90", "^--"), ("p99", "s:"))
RUN_STYLES = ("-", "--", "-.", ":")


def plot_report(
    runs: Sequence[dict], path: str | Path, *, p99_target_ms: float | None = None, title: str = ""
) -> Path:
    """Write :func:`build_figure` for ``runs`` (summaries from ``_bench_stats.summarise``) to ``path`` (PNG)."""
    path = Path(path)
    fig = build_figure(runs, p99_target_ms=p99_target_ms, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def operations(runs: Sequence[dict]) -> list[str]:
    """The operations measured in any run, in the order encode, decode, generate, then others."""
    return sorted({op for s in runs for op in s.get("by_op") or {}}, key=op_order)


def build_figure(runs: Sequence[dict], *, p99_target_ms: float | None = None, title: str = "") -> Figure:
    """The three panels (Agg, no display needed); each line and bar is labelled with its operation."""
    fig = Figure(figsize=(16, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax_tp, ax_cdf, ax_bar = fig.subplots(1, 3)
    ordered = sorted(runs, key=lambda s: s.get("rate") or s.get("concurrency") or 0)
    ops = operations(ordered)
    colors = {op: f"C{i}" for i, op in enumerate(ops)}

    for op in ops:
        per_run = [s["by_op"][op] for s in ordered if op in (s.get("by_op") or {})]
        for key, style in PERCENTILE_STYLES:
            pts = [(o["throughput_rps"], o["latency_ms"][key]) for o in per_run if o["latency_ms"][key] is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax_tp.plot(xs, ys, style, color=colors[op], label=f"{op} {key}")
    if p99_target_ms is not None:
        ax_tp.axhline(
            p99_target_ms, color="red", linestyle="--", linewidth=1, label=f"p99 target {p99_target_ms:g} ms"
        )
    ax_tp.set_xlabel("throughput of the operation (successful req/s)")
    ax_tp.set_ylabel("latency (ms, log)")
    top = max((o["throughput_rps"] for s in ordered for o in (s.get("by_op") or {}).values()), default=0.0)
    if top > 0:  # throughput from zero: one run's operations are not spread over a tiny range
        ax_tp.set_xlim(0, top * 1.1)
    ax_tp.set_yscale("log")
    ax_tp.set_title("latency percentiles per operation")
    ax_tp.grid(True, which="both", alpha=0.3)
    if ax_tp.lines:
        ax_tp.legend(loc="best", fontsize=7, ncol=max(1, len(ops)))

    many = len(ordered) > 1
    for i, s in enumerate(ordered):
        for op in ops:
            lat = np.asarray((s.get("by_op") or {}).get(op, {}).get("latencies_ms") or [], dtype=np.float64)
            if lat.size:
                label = f"{op}, {_label(s)}" if many else f"{op} (n={lat.size})"
                ax_cdf.plot(np.sort(lat), np.arange(1, lat.size + 1) / lat.size, color=colors[op],
                            linestyle=RUN_STYLES[i % len(RUN_STYLES)], label=label)
    ax_cdf.set_xlabel("latency (ms, log)")
    ax_cdf.set_ylabel("fraction of requests")
    ax_cdf.set_title("latency distribution per operation")
    if ax_cdf.lines:
        ax_cdf.set_xscale("log")
        ax_cdf.legend(loc="lower right", fontsize=7)
    ax_cdf.grid(True, which="both", alpha=0.3)

    width = 0.8 / max(1, len(ops))
    xs = np.arange(len(ordered))
    for j, op in enumerate(ops):
        heights = [(s.get("by_op") or {}).get(op, {}).get("throughput_rps", 0.0) for s in ordered]
        bars = ax_bar.bar(xs + (j - (len(ops) - 1) / 2) * width, heights, width, color=colors[op], label=op)
        ax_bar.bar_label(bars, fmt="%.2f", fontsize=7)
    ax_bar.set_xticks(xs, [_label(s) for s in ordered], fontsize=8, rotation=20 if many else 0)
    ax_bar.set_ylabel("successful req/s")
    ax_bar.set_title("throughput per operation")
    ax_bar.grid(True, axis="y", alpha=0.3)
    if ops:
        ax_bar.legend(loc="upper left", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _label(s: dict) -> str:
    if s.get("mode") == "closed":
        return f"concurrency {s.get('concurrency')}"
    return f"{s.get('rate', 0):.3g} req/s offered"
