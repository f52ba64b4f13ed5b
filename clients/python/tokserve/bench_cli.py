"""``tokserve bench``: the command-line face of :mod:`tokserve.loadtest`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime
from pathlib import Path

from ._bench_stats import format_table
from .loadtest import BenchConfig, OpSpec, run_bench, write_report

DEFAULT_MIX = ["encode:1", "decode:1", "generate:1"]


def add_bench_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``bench`` on the ``tokserve`` sub-command parser."""
    p = sub.add_parser(
        "bench",
        parents=[common],
        help="load test: closed / open loop / rate sweep -> JSON + PNG",
        description=(
            "Load-test one tokserve server. Stops by itself after --requests or --duration. "
            "Mix entries are op[:weight][:key=value,...], e.g. generate:2:class_id=207,steps=8 "
            "(guidance_interval=low/high); repeat --mix for several."
        ),
    )
    p.add_argument("--mode", choices=["closed", "open", "sweep"], default="closed")
    p.add_argument("--mix", action="append", help=f"operation mix entry (default {' '.join(DEFAULT_MIX)})")
    p.add_argument(
        "-c", "--concurrency", type=int, default=8, help="closed loop: workers (default %(default)s)"
    )
    p.add_argument("-r", "--rate", type=float, default=10.0, help="open loop / sweep start: req/s")
    p.add_argument("-n", "--requests", type=int, help="requests per run (default 200 unless --duration)")
    p.add_argument("-d", "--duration", type=float, help="seconds per run")
    p.add_argument(
        "--warmup", type=int, default=10, help="warm-up requests, not measured (default %(default)s)"
    )
    p.add_argument("--max-in-flight", type=int, default=512, help="open loop: pending cap (then 'dropped')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", help="image to encode (default: a synthetic one at the tokenizer's size)")
    p.add_argument("--p99-target-ms", type=float, default=1000.0, help="sweep: p99 latency target")
    p.add_argument("--max-error-rate", type=float, default=0.01, help="sweep: tolerated error fraction")
    p.add_argument("--sweep-rates", help="sweep: comma-separated rates instead of the automatic search")
    p.add_argument("--sweep-factor", type=float, default=2.0)
    p.add_argument("--sweep-max-rate", type=float, default=1000.0)
    p.add_argument(
        "--sweep-refine", type=int, default=2, help="sweep: bisection steps after the first failure"
    )
    p.add_argument("-o", "--output-dir", default="bench-results", help="where the JSON and PNG go")
    p.add_argument("--name", help="file stem of the outputs (default bench-MODE-TIMESTAMP)")
    p.add_argument("--no-plot", action="store_true", help="write only the JSON")
    p.set_defaults(func=cmd_bench)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    requests = args.requests if args.requests is not None else (None if args.duration else 200)
    return BenchConfig(
        url=args.url,
        mode=args.mode,
        mix=[OpSpec.parse(m) for m in (args.mix or DEFAULT_MIX)],
        concurrency=args.concurrency,
        rate=args.rate,
        requests=requests,
        duration=args.duration,
        warmup=args.warmup,
        timeout=args.timeout,
        retries=args.retries,
        max_in_flight=args.max_in_flight,
        seed=args.seed,
        image=args.image,
        api_key=args.api_key,
        p99_target_ms=args.p99_target_ms,
        max_error_rate=args.max_error_rate,
        sweep_rates=[float(r) for r in args.sweep_rates.split(",")] if args.sweep_rates else None,
        sweep_factor=args.sweep_factor,
        sweep_max_rate=args.sweep_max_rate,
        sweep_refine=args.sweep_refine,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    config.validate()
    report = asyncio.run(run_bench(config, log=lambda line: print(line, file=sys.stderr)))
    stem = args.name or f"bench-{config.mode}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.output_dir)
    json_path, png_path = write_report(
        report, out / f"{stem}.json", None if args.no_plot else out / f"{stem}.png"
    )
    print(format_table(report["runs"], by_op=True))
    if report["sweep"] is not None:
        best = report["sweep"]["best_rate"]
        target = report["sweep"]["p99_target_ms"]
        print(f"highest rate with p99 <= {target:g} ms: {'none' if best is None else f'{best:.3g} req/s'}")
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return 0
