"""SiT-XL/1 denoiser: one forward over batch 1..256 per fast-path variant, with the fp32-versus-variant error.

    python -m bench.denoiser                                    # sit-xl-64x32, batches 1..256, eager/graph variants
    python -m bench.denoiser --variants fp16+compile+graphs,bf16+compile+graphs --batches 64,128
    python -m bench.denoiser --device cpu --small               # sit-tiny-64x32 on the CPU

A call is what the sampler pays per model evaluation: copy x (float32), t, y into the bucket's input
buffers, run (graph replay or eager), copy the (B, L, C) output out as float32.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

from bench.common import (
    build_model,
    common_parser,
    errors,
    free_memory,
    int_list,
    measure,
)
from bench.flops import generator_forward_flops
from bench.report import Recorder, make_row, run_bench
from export.runtime import make_runner
from models.runtime import DEFAULT_BUCKETS, RunnerConfig, choose_bucket, precision_context

MODEL, SMALL_MODEL = "sit-xl-64x32", "sit-tiny-64x32"
VARIANTS = ("fp32", "tf32", "bf16-autocast", "bf16", "fp16", "bf16+graphs", "fp16+graphs")
SMALL_VARIANTS = ("fp32", "bf16", "fp16+graphs")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help=f"default {MODEL} ({SMALL_MODEL} with --small)")
    p.add_argument("--batches", type=int_list, default=None, help="default 1,2,4,...,256 (1,2,4,8 with --small)")
    p.add_argument("--check-batch", type=int, default=8)
    args = p.parse_args(argv)
    args.model = args.model or (SMALL_MODEL if args.small else MODEL)
    args.variants = args.variants or list(SMALL_VARIANTS if args.small else VARIANTS)
    args.batches = args.batches or ([1, 2, 4, 8] if args.small else list(DEFAULT_BUCKETS))
    args.warmup = (2 if args.small else 5) if args.warmup is None else args.warmup
    args.repeats = (3 if args.small else 20) if args.repeats is None else args.repeats
    args.check_batch = min(args.check_batch, 4) if args.small else args.check_batch
    return args


def inputs(cfg: object, n: int, g: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """x (n, L, C) N(0, 1) float32, t (n,) U[0, 1) float32, y (n,) classes in [0, num_classes] (null included)."""
    x = torch.randn(n, cfg.num_tokens, cfg.token_dim, generator=g, device=device)  # type: ignore[attr-defined]
    t = torch.rand(n, generator=g, device=device)
    y = torch.randint(0, cfg.num_classes + 1, (n,), generator=g, device=device)  # type: ignore[attr-defined]
    return x, t, y


def main(argv: list[str] | None = None) -> int:
    return run_bench("denoiser", parse(argv), run)


def run(args: argparse.Namespace, device: torch.device, rec: Recorder) -> None:
    model = build_model(args.model, device, args.seed)
    cfg = model.config
    flop = generator_forward_flops(cfg)
    g = torch.Generator(device=device).manual_seed(args.seed)
    data = {b: inputs(cfg, b, g, device) for b in args.batches}
    check = inputs(cfg, args.check_batch, g, device)
    with precision_context("fp32", device):
        ref = model(*check)
    buckets = sorted({choose_bucket(n, DEFAULT_BUCKETS) for n in [*args.batches, args.check_batch]})
    for spec in args.variants:
        config = RunnerConfig.parse(spec)
        den = make_runner(model, "denoiser", device, config=config, copy_module=True)  # the server's runner
        if config.cuda_graphs and not den.use_graphs:
            rec.note(f"{spec}: no CUDA on {device}: eager with the same bucketing")
        report = den.warmup(buckets)
        rec.warmups.append({"model": args.model, "variant": spec, **vars(report)})
        print(f"  {spec}: warm-up ({report.mode}, {report.compile}) {report.total_s:.1f} s", flush=True)
        errs = errors(den(*check), ref)
        for b in args.batches:
            t = measure(partial(den, *data[b]), device, warmup=args.warmup, repeats=args.repeats)
            ref_key = "denoiser/sit-xl@128" if b == 128 and args.model.startswith("sit-xl") else None
            rec.add(make_row(args.model, "forward", spec, b, t, flop, rec.peak["tflops"], ref_key, errs,
                             mode=den.mode, compile=den.compile_note))
        del den
        free_memory(device)
        rec.save()


if __name__ == "__main__":
    sys.exit(main())
