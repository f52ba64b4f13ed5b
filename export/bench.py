"""``python -m export.bench``: encode, decode and denoiser-step throughput per runtime, printed as a table.

    python -m export.bench                                          # shipped sizes, CPU, batches 1 and 32
    python -m export.bench --models softvq-tiny-64,sit-tiny-64x32 --runtimes torch,onnx --batches 1,8
    python -m export.bench --models softvq-bl-64,sit-xl-64x32 --device cuda --runtimes torch,torch-compile,torchscript

``--models`` takes registry names (seeded random weights: speed does not depend on the values), checkpoint
folders or export folders. Each cell is the median of timed calls after warm-up (``torch-compile`` compiles
during warm-up); ``max_rel`` is the largest relative difference from the eager ``torch`` output on the same
inputs, so a fast runtime that computes something else shows up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from export.exporter import export_model
from export.inputs import random_inputs, random_weights_model
from export.metadata import is_export_dir
from export.parity import compare
from export.parts import DEFAULT_PARTS, build_part, model_facts
from export.runtime import FORMAT_OF_KIND, RUNTIME_KINDS, make_runner, resolve_model
from models.runtime import RuntimeUnavailable

SHIPPED = ("softvq-s-64", "sit-s-64x32")
PART_LABEL = {"encoder": "encode", "decoder": "decode", "denoiser": "denoiser step",
              "denoiser_cfg": "guided step"}


@dataclass(frozen=True)
class BenchRow:
    model: str
    part: str
    runtime: str
    batch: int
    ms: float  # median milliseconds per call
    max_rel: float

    @property
    def per_second(self) -> float:
        return self.batch / (self.ms / 1e3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, args: tuple[torch.Tensor, ...], device: torch.device, *, warmup: int, repeats: int,
               min_time: float) -> tuple[float, torch.Tensor]:
    """Median seconds per call of ``fn(*args)`` (at least ``repeats`` calls and ``min_time`` seconds)."""
    out = None
    for _ in range(warmup):
        out = fn(*args)
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 1000):
        t0 = time.perf_counter()
        out = fn(*args)
        _sync(device)
        times.append(time.perf_counter() - t0)
    assert out is not None
    return statistics.median(times), out


def load_bench_model(name: str, seed: int = 0) -> nn.Module:
    return resolve_model(name) if Path(name).exists() else random_weights_model(name, seed)


def bench_model(name: str, runtimes: list[str], batches: list[int], device: torch.device, *, threads: int,
                warmup: int, repeats: int, min_time: float, export_dir: Path) -> list[BenchRow]:
    model = load_bench_model(name)
    facts = model_facts(model)
    parts = DEFAULT_PARTS[facts["kind"]]
    source: nn.Module | Path = model
    formats = sorted({FORMAT_OF_KIND[k] for k in runtimes if k in FORMAT_OF_KIND})
    if formats:
        if is_export_dir(name):
            source = Path(name)
        else:
            source = export_dir / Path(name).name
            export_model(model, source, source=name, formats=formats, parts=parts, check=False)
    rows: list[BenchRow] = []
    for part in parts:
        _, spec = build_part(model, part)
        for batch in batches:
            args = tuple(a.to(device) for a in random_inputs(spec, facts, batch, seed=batch))
            reference = None
            for kind in ["torch"] + [k for k in runtimes if k != "torch"]:
                try:
                    rt = make_runner(source if kind in FORMAT_OF_KIND else model, part, device,
                                     runtime=kind, threads=threads, copy_module=True)
                    sec, out = time_calls(rt, args, device, warmup=warmup, repeats=repeats, min_time=min_time)
                except RuntimeUnavailable as e:
                    print(f"# {name} {part} {kind}: unavailable ({e})", file=sys.stderr)
                    continue
                if reference is None:
                    reference = out
                rel = compare(part, kind, "random", out, reference).max_rel
                if kind in runtimes:
                    rows.append(BenchRow(name, part, rt.name, batch, sec * 1e3, rel))
                del rt
    return rows


def format_table(rows: list[BenchRow], markdown: bool = False) -> str:
    head = ["model", "part", "runtime", "batch", "ms / call", "items / s", "max_rel vs torch"]
    body = [[r.model, PART_LABEL.get(r.part, r.part), r.runtime, str(r.batch), f"{r.ms:.2f}",
             f"{r.per_second:.1f}", f"{r.max_rel:.1e}"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(SHIPPED))
    p.add_argument("--runtimes", default="torch,torchscript,onnx",
                   help=f"comma-separated, from {RUNTIME_KINDS}")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="intra-op threads for torch and onnxruntime alike")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per cell, at least")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    runtimes = [r for r in args.runtimes.split(",") if r]
    bad = sorted(set(runtimes) - set(RUNTIME_KINDS))
    if bad:
        p.error(f"unknown runtimes {bad}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="tokserve-bench-") as tmp:
        for name in [m for m in args.models.split(",") if m]:
            rows += bench_model(name, runtimes, [int(b) for b in args.batches.split(",")], device,
                                threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                                min_time=args.min_time, export_dir=Path(tmp))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"# torch {torch.__version__}, {where}, {os.cpu_count()} cores visible{load}")
    print(format_table(rows, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
