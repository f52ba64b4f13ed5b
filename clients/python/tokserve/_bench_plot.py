"""The load test's PNG: latency against throughput, and the latency distribution of each run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_report(
    runs: Sequence[dict], path: str | Path, *, p99_target_ms: float | None = None, title: str = ""
) -> Path:
    """Write the figure for ``runs`` (summaries from ``_bench_stats.summarise``) to ``path`` (PNG, Agg).

    Left: p50 and p99 latency against achieved throughput (one point per run, joined in offered-load order).
    Right: the empirical CDF of successful-request latency for each run.
    """
    path = Path(path)
    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_tp, ax_cdf = fig.subplots(1, 2)

    ordered = sorted(runs, key=lambda s: s.get("rate") or s.get("concurrency") or 0)
    xs = [s["throughput_rps"] for s in ordered]
    for key, style in (("p50", "o-"), ("p99", "s-")):
        ys = [s["latency_ms"][key] for s in ordered]
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if pts:
            ax_tp.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{key} latency")
    if p99_target_ms is not None:
        ax_tp.axhline(
            p99_target_ms, color="red", linestyle="--", linewidth=1, label=f"p99 target {p99_target_ms:g} ms"
        )
    ax_tp.set_xlabel("throughput (successful req/s)")
    ax_tp.set_ylabel("latency (ms)")
    ax_tp.set_title("latency vs throughput")
    ax_tp.grid(True, alpha=0.3)
    ax_tp.legend(loc="upper left", fontsize=8)

    for s in ordered:
        lat = np.asarray(s.get("latencies_ms") or [], dtype=np.float64)
        if lat.size:
            ax_cdf.plot(np.sort(lat), np.arange(1, lat.size + 1) / lat.size, label=_label(s))
    ax_cdf.set_xlabel("latency (ms)")
    ax_cdf.set_ylabel("fraction of requests")
    ax_cdf.set_title("latency distribution")
    ax_cdf.grid(True, alpha=0.3)
    if ordered:
        ax_cdf.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _label(s: dict) -> str:
    if s.get("mode") == "closed":
        return f"concurrency {s.get('concurrency')}"
    return f"{s.get('rate', 0):.3g} req/s offered"
