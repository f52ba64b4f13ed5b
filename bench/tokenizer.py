"""SoftVQ encode / decode throughput (images/s) per fast-path variant, with the fp32-versus-variant error.

    python -m bench.tokenizer                                  # the 4 published tokenizers, batch 64
    python -m bench.tokenizer --models softvq-l-64 --variants bf16+compile+graphs --batches 16,64,256
    python -m bench.tokenizer --device cpu --small             # softvq-tiny-64, CPU smoke run

The error check encodes ``--check-batch`` images (and decodes their fp32 tokens) with the variant and with
the plain fp32 model (TF32 off) and reports max |diff| and ||diff|| / ||fp32||.
"""

from __future__ import annotations

import argparse
import copy
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
    str_list,
)
from bench.flops import softvq_decode_flops, softvq_encode_flops
from bench.report import Recorder, make_row, run_bench
from export.runtime import make_runners
from models.runtime import DEFAULT_BUCKETS, RunnerConfig, choose_bucket, precision_context

MODELS = ("softvq-bl-64", "softvq-l-64", "softvq-bl-32", "softvq-bl-64-512")
VARIANTS = ("fp32", "bf16-autocast", "bf16", "bf16+graphs", "bf16+cl+graphs")
SMALL_MODELS = ("softvq-tiny-64",)
SMALL_VARIANTS = ("fp32", "bf16-autocast", "bf16+graphs")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--models", type=str_list, default=None, help=f"default {','.join(MODELS)}")
    p.add_argument("--ops", type=str_list, default=["encode", "decode"])
    p.add_argument("--batches", type=int_list, default=None, help="default 64 (4 with --small)")
    p.add_argument("--check-batch", type=int, default=8)
    args = p.parse_args(argv)
    args.models = args.models or list(SMALL_MODELS if args.small else MODELS)
    args.variants = args.variants or list(SMALL_VARIANTS if args.small else VARIANTS)
    args.batches = args.batches or ([4] if args.small else [64])
    args.warmup = 2 if args.warmup is None and args.small else (3 if args.warmup is None else args.warmup)
    args.repeats = 3 if args.repeats is None and args.small else (10 if args.repeats is None else args.repeats)
    args.check_batch = min(args.check_batch, 2) if args.small else args.check_batch
    bad = sorted(set(args.ops) - {"encode", "decode"})
    if bad:
        p.error(f"unknown ops {bad}")
    return args


def bench_model(name: str, args: argparse.Namespace, device: torch.device, rec: Recorder) -> None:
    model = build_model(name, device, args.seed)
    cfg = model.config
    size = cfg.image_size
    flops = {"encode": softvq_encode_flops(cfg), "decode": softvq_decode_flops(cfg)}
    g = torch.Generator(device=device).manual_seed(args.seed)
    images = {b: torch.rand(b, 3, size, size, generator=g, device=device) * 2 - 1 for b in args.batches}
    check = torch.rand(args.check_batch, 3, size, size, generator=g, device=device) * 2 - 1
    with torch.no_grad(), precision_context("fp32", device):
        ref_tokens = model.encode(check)
        ref_images = model.decode(ref_tokens)
        tokens = {b: model.encode(x) for b, x in images.items()}
    buckets = sorted({choose_bucket(n, DEFAULT_BUCKETS) for n in [*args.batches, args.check_batch]})
    for spec in args.variants:
        config = RunnerConfig.parse(spec)
        # the runners the server builds (export.runtime.make_runners), on a copy prepared for this variant
        tok = make_runners(copy.deepcopy(model), ("encoder", "decoder"), device, config=config)
        if config.cuda_graphs and not tok["encoder"].use_graphs:
            rec.note(f"{spec}: no CUDA on {device}: eager with the same bucketing")
        for runner in tok.values():
            rec.warmups.append({"model": name, "variant": spec, **vars(runner.warmup(buckets))})
        errs = {"encode": errors(tok["encoder"](check), ref_tokens),
                "decode": errors(tok["decoder"](ref_tokens), ref_images)}
        for op in args.ops:
            for b in args.batches:
                runner = tok["encoder" if op == "encode" else "decoder"]
                t = measure(partial(runner, images[b] if op == "encode" else tokens[b]), device,
                            warmup=args.warmup, repeats=args.repeats)
                rec.add(make_row(name, op, spec, b, t, flops[op], rec.peak["tflops"], f"{op}/{name}", errs[op],
                                 image_size=size, mode=runner.mode, compile=runner.compile_note))
        del tok
        free_memory(device)
        rec.save()
    del model
    free_memory(device)


def main(argv: list[str] | None = None) -> int:
    return run_bench("tokenizer", parse(argv), run)


def run(args: argparse.Namespace, device: torch.device, rec: Recorder) -> None:
    for name in args.models:
        bench_model(name, args, device, rec)


if __name__ == "__main__":
    sys.exit(main())
