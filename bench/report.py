"""Result rows, MFU, and the printed table (ours beside the reference)."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Timing, environment, peak_for, session, write_json
from bench.reference import REFERENCE_PEAK_TFLOPS, lookup, reference_table


@dataclass
class ResultRow:
    """One measurement. ``items`` are images (tokenizer, generation) or samples (denoiser forward)."""

    model: str
    op: str
    variant: str
    batch: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    items_per_s: float
    gflop_per_item: float
    tflops: float
    mfu: float
    mfu_ref: float
    ref_key: str | None = None
    err_max_abs: float | None = None
    err_rel: float | None = None
    finite: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_row(model: str, op: str, variant: str, batch: int, timing: Timing, flop_per_item: float,
             peak_tflops: float, ref_key: str | None = None, errors: dict[str, Any] | None = None,
             **extra: Any) -> ResultRow:
    """A row from a timing of one call over ``batch`` items; MFU against the measured peak and against
    issue 10's 686 TFLOP/s."""
    items_per_s = batch / (timing.median_ms * 1e-3)
    tflops = flop_per_item * items_per_s / 1e12
    errs = errors or {}
    return ResultRow(model, op, variant, batch, timing.median_ms, timing.p10_ms, timing.p90_ms, items_per_s,
                     flop_per_item / 1e9, tflops, tflops / peak_tflops, tflops / REFERENCE_PEAK_TFLOPS,
                     ref_key if ref_key and lookup(ref_key) else None, errs.get("err_max_abs"), errs.get("err_rel"),
                     errs.get("finite"), dict(extra))


HEAD = ("model", "op", "variant", "batch", "ms", "items/s", "GFLOP/it", "TFLOP/s", "MFU", "MFU@686", "err_rel",
        "reference")


def _ref_text(row: ResultRow) -> str:
    ref = lookup(row.ref_key) if row.ref_key else None
    return ref.text() if ref else ""


def format_table(rows: list[ResultRow], peak: dict[str, Any]) -> str:
    """Fixed-width table; MFU is against ``peak`` (measured), MFU@686 against issue 10's denominator."""
    cells = [HEAD]
    for r in rows:
        err = "-" if r.err_rel is None else f"{r.err_rel:.1e}" + ("" if r.finite in (None, True) else " NaN!")
        cells.append((r.model, r.op, r.variant, str(r.batch), f"{r.median_ms:.3f}", f"{r.items_per_s:,.1f}",
                      f"{r.gflop_per_item:,.4g}", f"{r.tflops:.4g}", f"{100 * r.mfu:.1f}%",
                      f"{100 * r.mfu_ref:.1f}%", err, _ref_text(r)))
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEAD))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"MFU against the measured peak {peak['tflops']:.1f} TFLOP/s ({peak['note']}); MFU@686 against "
                 f"issue 10's {REFERENCE_PEAK_TFLOPS:g} TFLOP/s bf16 H100 figure. err_rel: ||fast - fp32|| / ||fp32||.")
    return "\n".join(lines)


def header(env: dict[str, Any]) -> str:
    return (f"# {env['device']} | torch {env['torch']} (CUDA {env['cuda']}) | {env['date']} | "
            f"commit {env.get('commit') or '?'}")


class Recorder:
    """Collects the rows of one benchmark run and (re)writes its JSON after every :meth:`save`, so a run
    cut short by a time limit still leaves its finished rows on disk."""

    def __init__(self, bench: str, args: Any, device: Any, peak: dict[str, Any]) -> None:
        self.bench = bench
        self.device = device
        self.env = environment(device)
        self.peak = peak
        self.args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        self.rows: list[ResultRow] = []
        self.warmups: list[dict[str, Any]] = []
        self.notes: list[str] = []
        out: Path = args.out
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.path = out if out.suffix == ".json" else out / f"{bench}_{device.type}_{stamp}.json"

    def add(self, row: ResultRow, echo: bool = True) -> ResultRow:
        self.rows.append(row)
        if echo:
            err = "" if row.err_rel is None else f"  err_rel {row.err_rel:.1e}"
            print(f"  {row.model} {row.op} {row.variant} b={row.batch}: {row.median_ms:.3f} ms, "
                  f"{row.items_per_s:,.1f}/s, {100 * row.mfu:.1f}% MFU{err}", flush=True)
        return row

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.notes.append(text)

    def record(self) -> dict[str, Any]:
        return {"bench": self.bench, "env": self.env, "peak": self.peak, "args": self.args, "rows": self.rows,
                "warmups": self.warmups, "notes": self.notes}

    def save(self) -> Any:
        return write_json(self.record(), self.path, self.bench, self.device)

    def finish(self) -> None:
        path = self.save()
        print()
        print(header(self.env))
        print(format_table(self.rows, self.peak))
        print(reference_table())
        print(f"wrote {path}")


def run_bench(bench: str, args: argparse.Namespace, body: Callable[[argparse.Namespace, Any, Recorder], None]) -> int:
    """The shell of every benchmark command: session (device, threads, no autograd), peak, recorder, body,
    final table and JSON."""
    with session(args) as device:
        rec = Recorder(bench, args, device, peak_for(args, device))
        print(f"{bench} bench on {rec.env['device']}: peak {rec.peak['tflops']:.3g} TFLOP/s", flush=True)
        body(args, device, rec)
        rec.finish()
    return 0
