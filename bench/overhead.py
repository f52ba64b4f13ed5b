"""Host overhead of the server's loops on the CPU: the engine's loop per step against the model's own forward.

    python -m bench.overhead                  # sit-tiny-64x32 and sit-s-64x32, batches 1,8,32,64; shipped tokenizer
    python -m bench.overhead --quick          # the CI smoke run: tiny SiT, batches 1 and 8, a few steps (seconds)
    python -m bench.overhead --profile        # also cProfile the device thread and the event loop (top entries)

Generation runs through :class:`bench.engine_harness.EngineHarness`: the server's ``Engine`` with its
``GenerateLoop``, ``GenerationScheduler``, ``FlowSampler`` (SDE) and runtime, fed ``B`` one-image jobs at once
(B concurrent requests). Per step it reads the loop's period (the gap between its progress reports) and the
time inside the SiT's ``forward`` during that step (forward hooks); **overhead per step = period - forward**,
everything the server does around the model (queue, asyncio, the device-thread hop, scheduler, sampler,
guidance packing, runtime copies, progress). Guidance is on for every step by default (cfg 1.75 on [0, 1]),
so a batch of B rows is a forward of 2B model rows. The overhead is split with the engine's own step timer
(``tokserve_denoise_step_seconds``) into the loop around the step (queue, asyncio, device-thread hop,
reports) and the sampler / runtime work inside it (row stacking, per-row noise, guidance packing, the SDE
drift in float64, runtime copies). The bare forward (the module alone, same rows, timed
apart) is printed beside it as a check of the in-loop figure.

Encode / decode: ``B`` one-image jobs submitted at once through the engine's ``BatchLoop`` (queue, batcher,
device thread, runtime) against the tokenizer module's own ``encode`` / ``decode`` on the same batch,
interleaved ``--repeats`` times; overhead = median loop time - median bare time.

The goal (issue 17): overhead per step under 1 ms at batch 64 and under 10% of the step for the medium model.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, environment, int_list, measure, str_list, write_json
from bench.engine_harness import EngineHarness

SMALL, MEDIUM = "sit-tiny-64x32", "sit-s-64x32"
TOKENIZER = "weights/default/tokenizer"
GOAL_US, GOAL_FRACTION, GOAL_BATCH = 1000.0, 0.10, 64


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--generators", type=str_list, default=None,
                   help=f"registry SiT names (default {SMALL},{MEDIUM}; {SMALL} with --quick)")
    p.add_argument("--batches", type=int_list, default=None, help="rows per step (default 1,8,32,64; 1,8 --quick)")
    p.add_argument("--steps", type=int, default=None,
                   help="SDE steps per run (default 8; 5 with --quick); steps 3 .. S-1 are measured")
    p.add_argument("--cfg-scale", type=float, default=1.75)
    p.add_argument("--guidance-high", type=float, default=1.0, help="guidance on [0, this] (1: every step)")
    p.add_argument("--tokenizer", default=TOKENIZER, help="tokenizer folder or registry name ('' to skip)")
    p.add_argument("--tok-batches", type=int_list, default=None, help="default 1,8,32,64 (1,8 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--profile", action="store_true", help="cProfile one run per generator (top functions)")
    p.add_argument("--quick", "--small", dest="quick", action="store_true",
                   help="tiny SiT, batches 1 and 8, few steps: the CI smoke run")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder (or .json file) for the raw results")
    a = p.parse_args(argv)
    a.generators = a.generators or ([SMALL] if a.quick else [SMALL, MEDIUM])
    a.batches = a.batches or ([1, 8] if a.quick else [1, 8, 32, 64])
    a.tok_batches = a.tok_batches or ([1, 8] if a.quick else [1, 8, 32, 64])
    a.steps = a.steps or (5 if a.quick else 8)
    a.repeats = a.repeats or (1 if a.quick else 3)
    if a.steps < 4:
        p.error("--steps must be >= 4 (the first and last steps are not measured)")
    return a


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def bare_forward_ms(h: EngineHarness, name: str, model_rows: int, repeats: int) -> float:
    """The generator module alone on ``model_rows`` rows (in the device thread, like the engine's calls)."""
    rt = h.runtime(name)
    L, C = rt.spec.token_shape
    x = torch.randn(model_rows, L, C, device=rt.device, dtype=rt.dtype)
    t = torch.rand(model_rows, device=rt.device, dtype=rt.dtype)
    y = torch.zeros(model_rows, dtype=torch.long, device=rt.device)

    def run() -> float:
        with torch.inference_mode():
            return measure(lambda: rt.module(x, t, y), rt.device, warmup=1, repeats=repeats).median_ms

    return float(await h.engine.device.run(run))


async def bare_tokenizer_ms(h: EngineHarness, name: str, op: str, batch: torch.Tensor) -> float:
    rt = h.runtime(name)
    fn = rt.module.encode if op == "encode" else rt.module.decode

    def run() -> float:
        with torch.inference_mode():
            return measure(lambda: fn(batch), rt.device, warmup=0, repeats=1).median_ms

    return float(await h.engine.device.run(run))


async def measure_generation(h: EngineHarness, name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for b in args.batches:
        await h.generate(name, b, 4, cfg_scale=args.cfg_scale, guidance=(0.0, args.guidance_high))  # warm-up
        periods, forwards, model_rows, sampler_steps = [], [], [], []
        for r in range(args.repeats):
            run = await h.generate(name, b, args.steps, cfg_scale=args.cfg_scale,
                                   guidance=(0.0, args.guidance_high), seed=1000 * r)
            if not run.together or not len(run.forward_s) == len(run.sampler_step_s) == len(run.periods_s):
                raise RuntimeError(f"{name} batch {b}: the jobs did not step together; cannot attribute steps")
            periods += run.periods_s
            forwards += run.forward_s
            model_rows += run.model_rows
            sampler_steps += run.sampler_step_s
        over = [p - f for p, f in zip(periods, forwards, strict=True)]
        loop_over = [p - s for p, s in zip(periods, sampler_steps, strict=True)]
        mrows = int(_median([float(m) for m in model_rows]))
        bare = await bare_forward_ms(h, name, mrows, max(3, args.repeats))
        step_ms = 1e3 * _median(periods)
        over_us = 1e6 * _median(over)
        forward_ms = 1e3 * _median(forwards)
        loop_us = 1e6 * _median(loop_over)
        rows.append({"part": "generate", "model": name, "batch": b, "model_rows": mrows, "steps_measured": len(over),
                     "step_ms": step_ms, "sampler_step_ms": 1e3 * _median(sampler_steps),
                     "forward_in_loop_ms": forward_ms,
                     "bare_forward_ms": bare, "overhead_us": over_us, "overhead_fraction": over_us / (1e3 * step_ms),
                     "loop_us": loop_us,
                     "sampler_us": 1e6 * _median([s - f for s, f in zip(sampler_steps, forwards, strict=True)]),
                     "overhead_vs_bare_us": 1e3 * (step_ms - bare),
                     "overhead_us_samples": [1e6 * o for o in over]})
        print(_gen_line(rows[-1]), flush=True)
    return rows


async def measure_tokenizer(h: EngineHarness, name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rt = h.runtime(name)
    s, (L, D) = rt.spec.image_size, rt.spec.token_shape
    rows = []
    for op in ("encode", "decode"):
        for b in args.tok_batches:
            g = torch.Generator().manual_seed(b)
            batch = (torch.rand(b, 3, s, s, generator=g) * 2 - 1) if op == "encode" else \
                torch.randn(b, L, D, generator=g)
            await h.tokenize(op, name, batch)  # warm-up at this size
            loop, bare = [], []
            for _ in range(args.repeats):  # interleaved, so both see the same machine load
                bare.append(await bare_tokenizer_ms(h, name, op, batch))
                loop.append(1e3 * (await h.tokenize(op, name, batch))[0])
            lm, bm = _median(loop), _median(bare)
            rows.append({"part": op, "model": name, "batch": b, "loop_ms": lm, "bare_ms": bm,
                         "overhead_ms": lm - bm, "overhead_fraction": (lm - bm) / lm, "loop_samples_ms": loop,
                         "bare_samples_ms": bare})
            print(_tok_line(rows[-1]), flush=True)
    return rows


def _gen_line(r: dict[str, Any]) -> str:
    return (f"{r['model']:<16} b{r['batch']:<4} rows {r['model_rows']:<4} step {r['step_ms']:9.2f} ms  "
            f"forward {r['forward_in_loop_ms']:9.2f} ms (bare {r['bare_forward_ms']:9.2f})  "
            f"overhead {r['overhead_us']:8.0f} us  {100 * r['overhead_fraction']:5.1f}%  "
            f"(loop {r['loop_us']:6.0f} + sampler/runtime {r['sampler_us']:7.0f})")


def _tok_line(r: dict[str, Any]) -> str:
    return (f"{r['model']:<16} {r['part']:<6} b{r['batch']:<4} loop {r['loop_ms']:9.2f} ms  bare {r['bare_ms']:9.2f} ms"
            f"  overhead {r['overhead_ms']:8.2f} ms  {100 * r['overhead_fraction']:5.1f}%")


def goal(rows: list[dict[str, Any]], medium: str) -> dict[str, Any]:
    """Issue 17's goal on the medium model at batch 64 (or the largest batch measured)."""
    cand = [r for r in rows if r["part"] == "generate" and r["model"] == medium]
    if not cand:
        return {"checked": False}
    r = next((r for r in cand if r["batch"] == GOAL_BATCH), max(cand, key=lambda r: r["batch"]))
    return {"checked": True, "model": medium, "batch": r["batch"], "overhead_us": r["overhead_us"],
            "overhead_fraction": r["overhead_fraction"],
            "met": r["overhead_us"] < GOAL_US and r["overhead_fraction"] < GOAL_FRACTION}


def _profiled_summary(prof: cProfile.Profile, top: int = 18) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


async def profile_generation(h: EngineHarness, name: str, args: argparse.Namespace) -> dict[str, str]:
    """cProfile one run in each thread that works: the device thread (scheduler, sampler, runtime, model)
    and the event loop (queue, batching, reports)."""
    b = max(args.batches)
    dev, loop = cProfile.Profile(), cProfile.Profile()
    await h.engine.device.run(dev.enable)
    loop.enable()
    await h.generate(name, b, args.steps, cfg_scale=args.cfg_scale, guidance=(0.0, args.guidance_high))
    loop.disable()
    await h.engine.device.run(dev.disable)
    out = {"device_thread": _profiled_summary(dev), "event_loop": _profiled_summary(loop)}
    print(f"\n# cProfile, {name} batch {b}, {args.steps} steps: device thread (tottime)\n{out['device_thread']}")
    print(f"# event loop thread (tottime)\n{out['event_loop']}")
    return out


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    entries = ([args.tokenizer] if args.tokenizer else []) + list(args.generators)
    if not args.tokenizer:
        raise SystemExit("a generator needs a tokenizer to decode its latents: give --tokenizer")
    biggest = max(args.batches + args.tok_batches)
    record: dict[str, Any] = {"bench": "overhead", "args": {k: (str(v) if isinstance(v, Path) else v)
                                                             for k, v in vars(args).items()}}
    async with EngineHarness(entries, device="cpu", max_batch_size=biggest, torch_threads=args.threads,
                             queue_capacity=max(256, biggest)) as h:
        record["env"] = environment(torch.device("cpu"))
        print(f"# overhead bench on {record['env']['device']} | torch {record['env']['torch']} | "
              f"load average {record['env']['load_average']}", flush=True)
        tok = next(n for n, s in h.engine.models.specs.items() if s.kind == "tokenizer")
        gens = [n for n, s in h.engine.models.specs.items() if s.kind == "generator"]
        rows: list[dict[str, Any]] = []
        for g in gens:
            rows += await measure_generation(h, g, args)
        rows += await measure_tokenizer(h, tok, args)
        if args.profile:
            record["profile"] = {g: await profile_generation(h, g, args) for g in gens}
        record["rows"] = rows
        record["goal"] = goal(rows, gens[-1])
        record["env"]["load_average_end"] = environment(torch.device("cpu"))["load_average"]
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    threads = torch.get_num_threads()
    try:
        record = asyncio.run(amain(args))
    finally:  # the engine sets the process-wide thread count (TOKSERVE_TORCH_THREADS)
        torch.set_num_threads(threads)
    g = record["goal"]
    if g["checked"]:
        print(f"\ngoal (issue 17, {g['model']} at batch {g['batch']}): overhead {g['overhead_us']:.0f} us per step, "
              f"{100 * g['overhead_fraction']:.1f}% of the step -> {'met' if g['met'] else 'NOT met'} "
              f"(< {GOAL_US:.0f} us and < {100 * GOAL_FRACTION:.0f}%)")
    path = write_json(record, args.out, "overhead", torch.device("cpu"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
