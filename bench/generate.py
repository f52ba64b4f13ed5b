"""Full generation: SiT-XL/1 sampling (250 steps, SDE and ODE, guidance 1.75 on [0, 0.7]) then a SoftVQ
decode, in images/s at batch 64, per fast-path variant, with the fp32-versus-variant error of the latents.

    python -m bench.generate                                   # sit-xl_softvq-l-64 + softvq-l-64, batch 64
    python -m bench.generate --variants fp16+compile+graphs,bf16+compile+graphs --samplers sde
    python -m bench.generate --device cpu --small              # tiny models, 10 steps, CPU smoke run

Time per image = (median sampling time of the batch + median decode time of the batch) / batch. Sampling
runs through ``--api``: ``functional`` (the official-recipe samplers over the whole batch, noise on the
device) or ``step`` (the server's :class:`~models.sampling.FlowSampler` rows, per-row generators on the device), or
``both``. The unconditional pass runs only inside the guidance interval (so 422 model rows per image for
250 SDE steps, not 500). fp32 sampling is timed over ``--fp32-steps`` steps and scaled by the model rows
of the full schedule (marked ``extrapolated``). The error check samples ``--check-batch`` images with the
same seeds through the variant and through the plain fp32 model (TF32 off) and compares the latents.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from bench.common import (
    Timing,
    build_model,
    common_parser,
    errors,
    free_memory,
    measure,
    str_list,
)
from bench.flops import forwards_per_image, generation_flops
from bench.report import Recorder, make_row, run_bench
from export.runtime import make_runner
from models.runtime import DEFAULT_BUCKETS, RunnerConfig, choose_bucket, precision_context
from models.sampling import (
    FlowSampler,
    SampleRequest,
    euler_maruyama_sampler,
    euler_sampler,
    run_to_completion,
)

GENERATOR, TOKENIZER = "sit-xl_softvq-l-64", "softvq-l-64"
SMALL_GENERATOR, SMALL_TOKENIZER = "sit-tiny-64x32", "softvq-tiny-64"
VARIANTS = ("fp32", "bf16", "bf16+graphs", "fp16+graphs")
SMALL_VARIANTS = ("fp32", "bf16+graphs")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--generator", default=None, help=f"default {GENERATOR} ({SMALL_GENERATOR} with --small)")
    p.add_argument("--tokenizer", default=None, help=f"default {TOKENIZER} ({SMALL_TOKENIZER} with --small)")
    p.add_argument("--batch", type=int, default=None, help="images per generation (default 64; 4 with --small)")
    p.add_argument("--steps", type=int, default=None, help="default 250 (10 with --small)")
    p.add_argument("--samplers", type=str_list, default=["sde", "euler"], help="sde (SDE), euler (ODE), heun")
    p.add_argument("--cfg-scale", type=float, default=1.75)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=0.7)
    p.add_argument("--path-type", default="cosine", help="SDE interpolant (the published recipe: cosine)")
    p.add_argument("--api", choices=("functional", "step", "both"), default=None,
                   help="default functional (both with --small)")
    p.add_argument("--check-batch", type=int, default=8)
    p.add_argument("--fp32-steps", type=int, default=25, help="steps timed for fp32 variants (then scaled)")
    args = p.parse_args(argv)
    args.generator = args.generator or (SMALL_GENERATOR if args.small else GENERATOR)
    args.tokenizer = args.tokenizer or (SMALL_TOKENIZER if args.small else TOKENIZER)
    args.variants = args.variants or list(SMALL_VARIANTS if args.small else VARIANTS)
    args.batch = args.batch or (4 if args.small else 64)
    args.steps = args.steps or (10 if args.small else 250)
    args.api = args.api or ("both" if args.small else "functional")
    args.warmup = 1 if args.warmup is None else args.warmup
    args.repeats = (1 if args.small else 2) if args.repeats is None else args.repeats
    args.check_batch = min(args.check_batch, 2) if args.small else args.check_batch
    bad = sorted(set(args.samplers) - {"sde", "euler", "heun"})
    if bad:
        p.error(f"unknown samplers {bad}")
    return args


ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_functional(model_fn: ModelFn, cfg: Any, args: argparse.Namespace, sampler: str, n: int, seed: int,
                      steps: int, device: torch.device) -> torch.Tensor:
    """(n, L, C) float64 latents from the official-recipe sampler; noise and classes from one device
    generator seeded ``seed`` (so two runs with the same seed see the same noise)."""
    g = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(n, cfg.num_tokens, cfg.token_dim, generator=g, device=device)
    y = torch.randint(0, cfg.num_classes, (n,), generator=g, device=device)
    kw: dict[str, Any] = {"num_steps": steps, "cfg_scale": args.cfg_scale, "guidance_low": args.guidance_low,
                          "guidance_high": args.guidance_high, "null_class": cfg.num_classes,
                          "model_dtype": torch.float32}
    if sampler == "sde":
        return euler_maruyama_sampler(model_fn, z, y, path_type=args.path_type, generator=g, **kw)
    return euler_sampler(model_fn, z, y, heun=sampler == "heun", **kw)


def sample_steps(model_fn: ModelFn, cfg: Any, args: argparse.Namespace, sampler: str, n: int, seed: int,
                 steps: int, device: torch.device) -> torch.Tensor:
    """(n, L, C) float64 latents through the step API the server runs (rows with their own generators)."""
    fs = FlowSampler(sampler, null_class=cfg.num_classes, device=device)
    reqs = [SampleRequest(class_id=(seed + i) % cfg.num_classes, seed=seed + i, steps=steps,
                          cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
                          guidance_high=args.guidance_high, sampler=sampler, path_type=args.path_type)
            for i in range(n)]
    return run_to_completion(fs, model_fn, reqs, (cfg.num_tokens, cfg.token_dim))


SAMPLE = {"functional": sample_functional, "step": sample_steps}


def ref_key(args: argparse.Namespace, sampler: str, spec: str) -> str | None:
    if sampler != "sde" or not args.generator.startswith("sit-xl") or args.tokenizer != "softvq-l-64":
        return None
    if spec == "fp32":
        return "generate/sde/fp32"
    if spec in ("bf16", "bf16-autocast"):
        return "generate/sde/bf16-eager"
    return "generate/sde"


def main(argv: list[str] | None = None) -> int:
    return run_bench("generate", parse(argv), run)


def run(args: argparse.Namespace, device: torch.device, rec: Recorder) -> None:
    sit = build_model(args.generator, device, args.seed)
    tok = build_model(args.tokenizer, device, args.seed + 1)
    gcfg, tcfg = sit.config, tok.config
    if (gcfg.num_tokens, gcfg.token_dim) != (tcfg.num_tokens, tcfg.token_dim):
        raise SystemExit(f"{args.generator} makes {gcfg.num_tokens}x{gcfg.token_dim} tokens, "
                         f"{args.tokenizer} decodes {tcfg.num_tokens}x{tcfg.token_dim}")
    with precision_context("fp32", device):
        refs = {s: sample_functional(sit, gcfg, args, s, args.check_batch, args.seed + 1000, args.steps, device)
                for s in args.samplers}
    for s in args.samplers:
        cond, uncond = forwards_per_image(s, args.steps, args.cfg_scale, args.guidance_low, args.guidance_high)
        rec.note(f"{s}: {cond} + {uncond} model rows per image (the unconditional pass only inside "
                 f"[{args.guidance_low}, {args.guidance_high}]; {2 * cond} if it always ran)")
    for spec in args.variants:
        bench_variant(spec, sit, tok, refs, args, device, rec)
        free_memory(device)
        rec.save()


def bench_variant(spec: str, sit: torch.nn.Module, tok: torch.nn.Module, refs: dict[str, torch.Tensor],
                  args: argparse.Namespace, device: torch.device, rec: Recorder) -> None:
    """Warm up one variant (graph capture / compilation), time its decode, then each sampler x API."""
    gcfg, tcfg = sit.config, tok.config
    seed = args.seed + 1000
    config = RunnerConfig.parse(spec)
    den = make_runner(sit, "denoiser", device, config=config, copy_module=True)  # the server's runners
    dec = make_runner(tok, "decoder", device, config=config, copy_module=True)
    if config.cuda_graphs and not den.use_graphs:
        rec.note(f"{spec}: no CUDA on {device}: eager with the same bucketing")
    model_rows = (args.batch, 2 * args.batch, args.check_batch, 2 * args.check_batch)
    for runner, sizes in ((den, model_rows), (dec, (args.batch, args.check_batch))):
        report = runner.warmup(sorted({choose_bucket(n, DEFAULT_BUCKETS) for n in sizes}))
        rec.warmups.append({"variant": spec, **vars(report)})
        print(f"  {spec}: {report.name} warm-up ({report.mode}, {report.compile}) {report.total_s:.1f} s", flush=True)
    g = torch.Generator(device=device).manual_seed(seed)
    tokens = tok.denormalize_latents(torch.randn(args.batch, gcfg.num_tokens, gcfg.token_dim, generator=g,
                                                 device=device)).float()
    t_dec = measure(partial(dec, tokens), device, warmup=2, repeats=max(3, args.repeats))
    shortened = config.precision == "fp32" and not args.small and args.fp32_steps < args.steps
    timed_steps = args.fp32_steps if shortened else args.steps
    for s in args.samplers:
        errs = errors(sample_functional(den, gcfg, args, s, args.check_batch, seed, args.steps, device), refs[s])
        flops = generation_flops(gcfg, tcfg, s, args.steps, args.cfg_scale, args.guidance_low, args.guidance_high)
        scale = flops.rows / sum(forwards_per_image(s, timed_steps, args.cfg_scale, args.guidance_low,
                                                    args.guidance_high))
        for api in (["functional", "step"] if args.api == "both" else [args.api]):
            fn = SAMPLE[api]
            for _ in range(args.warmup):
                fn(den, gcfg, args, s, args.batch, seed, min(3, args.steps), device)
            t = measure(partial(fn, den, gcfg, args, s, args.batch, seed, timed_steps, device), device, warmup=0,
                        repeats=args.repeats)
            total = Timing(t.median_ms * scale + t_dec.median_ms, t.p10_ms * scale + t_dec.p10_ms,
                           t.p90_ms * scale + t_dec.p90_ms, [], t.clock)
            op = f"generate-{'sde' if s == 'sde' else 'ode-' + s}" + ("" if api == "functional" else "-step")
            rec.add(make_row(f"{args.generator}+{args.tokenizer}", op, spec, args.batch, total, flops.total,
                             rec.peak["tflops"], ref_key(args, s, spec), errs, api=api, steps=args.steps,
                             timed_steps=timed_steps, extrapolated=scale != 1.0, sample_ms=t.median_ms * scale,
                             sample_samples_ms=t.samples_ms, decode_ms=t_dec.median_ms,
                             model_rows_per_image=flops.rows, mode=den.mode, compile=den.compile_note))


if __name__ == "__main__":
    sys.exit(main())
