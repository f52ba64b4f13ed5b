"""Throughput against batch size, one line per (model, op, variant), from the benchmarks' raw JSON.

    python -m bench.plot bench/results/denoiser_cuda_*.json                 # -> beside the first JSON, .png
    python -m bench.plot bench/results/tokenizer_*.json --out bench/results/tokenizer.png --mfu
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def series(records: list[dict[str, Any]], metric: str = "items_per_s") -> dict[str, list[tuple[int, float]]]:
    """label -> sorted (batch, metric) points; the label names the device when records come from several."""
    devices = {r["env"]["device"] for r in records}
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for rec in records:
        for row in rec["rows"]:
            label = f"{row['model']} {row['op']} {row['variant']}"
            if len(devices) > 1:
                label += f" [{rec['env']['device']}]"
            out[label].append((int(row["batch"]), float(row[metric])))
    return {k: sorted(v) for k, v in out.items()}


def plot(paths: list[Path], out: Path, mfu: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(p.read_text()) for p in paths]
    metric = "mfu" if mfu else "items_per_s"
    data = series(records, metric)
    if not data:
        raise SystemExit("no result rows in " + ", ".join(map(str, paths)))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, pts in sorted(data.items()):
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, [100 * y for y in ys] if mfu else ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    if not mfu:
        ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("MFU (% of measured matmul peak)" if mfu else "items/s (images or samples)")
    env = records[0]["env"]
    ax.set_title(f"{records[0]['bench']}: {env['device']}, torch {env['torch']}, {env['date'][:10]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: the first JSON with .png)")
    p.add_argument("--mfu", action="store_true", help="plot MFU instead of throughput")
    args = p.parse_args(argv)
    out = args.out or args.json[0].with_suffix(".mfu.png" if args.mfu else ".png")
    print(f"wrote {plot(args.json, out, args.mfu)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
