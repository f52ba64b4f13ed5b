"""The GPU plan (issue 17 item 7): the server path, measured in one run of at most ``--budget-s`` seconds.

    python -m bench.gpu_plan --out $OUT                       # the lent H200: SiT-XL/1 + softvq-l-64
    python -m bench.gpu_plan --small --device cpu             # tiny models, a few steps: the CPU smoke run

Parts, in this order, each under its own wall-clock cap (a share of ``--budget-s``); the JSON is written
again after every row, so a run cut short keeps what finished:

1. ``peak``: the MFU denominator (``bench.peak``: 8192^3 bf16 matmul on CUDA).
2. ``folders``: random-weight model folders (``config.json`` + safetensors, bf16 on disk, read back as float32
   like any served checkpoint) of ``sit-xl_softvq-l-64`` and ``softvq-l-64``, built on the device.
3. ``engine``: generation through the server's own ``Engine`` in process (``bench.engine_harness``: queue,
   ``GenerateLoop``, scheduler, ``FlowSampler``, runtime, then the tokenizer's decode), ``B`` one-image jobs at
   once (B = 1, 2, 4 ... 256), 250 SDE steps, cfg 1.75 on [0, 0.7], for each ``--dtypes`` (``TOKSERVE_DTYPE``).
   img/s = B / (submission to the last result), so the decode and the admission are in.
4. ``tokenizer``: encode and decode through the engine's ``BatchLoop`` (B one-image jobs) and the module
   alone, B = 1 ... 256.
5. ``http``: ``python -m server`` on localhost (uvicorn, the same folders and settings), B concurrent
   ``POST /v1/generate`` (one image each, PNG) from one httpx client; img/s = B / wall.

MFU = FLOPs of the work done (``bench.flops``: 422 model rows per image for 250 SDE steps with guidance on
[0, 0.7], plus a decode) / wall / the measured peak. Before each batch size a part estimates its time from
the last one and skips it (``"skipped": "budget"``) when it would overrun the part's cap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, build_model, environment, int_list, measure, str_list
from bench.engine_harness import EngineHarness
from bench.flops import generation_flops, softvq_decode_flops, softvq_encode_flops
from bench.peak import measure_peak

GENERATOR, TOKENIZER = "sit-xl_softvq-l-64", "softvq-l-64"
SMALL_GENERATOR, SMALL_TOKENIZER = "sit-tiny-64x32", "softvq-tiny-64"
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SMALL_BATCHES = (1, 2, 4)
# shares of the budget per part (what is left at the end is slack for start-up and the server's start)
SHARES = {"peak": 0.02, "folders": 0.08, "engine": 0.40, "tokenizer": 0.10, "http": 0.30}
MIN_LOAD_S = 30.0  # a part that cannot load its models and run a batch in this long is skipped


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--small", action="store_true", help="tiny models, 6 steps, batches 1,2,4: the CPU smoke run")
    p.add_argument("--budget-s", type=float, default=None, help="whole-run wall-clock budget (default 420; 120 --small)")
    p.add_argument("--batches", type=int_list, default=None, help="generation batches (default 1,2,4 ... 256)")
    p.add_argument("--tok-batches", type=int_list, default=None, help="tokenizer batches (default as --batches)")
    p.add_argument("--steps", type=int, default=None, help="SDE steps (default 250; 6 with --small)")
    p.add_argument("--cfg-scale", type=float, default=1.75)
    p.add_argument("--guidance", type=float, nargs=2, default=(0.0, 0.7), metavar=("LOW", "HIGH"))
    p.add_argument("--dtypes", type=str_list, default=None,
                   help="TOKSERVE_DTYPE values for the engine part (default bfloat16,float32; float32 on the CPU)")
    p.add_argument("--http-dtype", default=None,
                   help="TOKSERVE_DTYPE of the tokenizer part and the HTTP server (default: the first --dtypes "
                        "that ran in the engine part)")
    p.add_argument("--parts", type=str_list, default=["peak", "engine", "tokenizer", "http"],
                   help="which of peak, engine, tokenizer, http")
    p.add_argument("--work", type=Path, default=Path("/tmp/tokserve-gpu-plan"), help="where the folders go")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder (or .json file) for the results")
    a = p.parse_args(argv)
    a.budget_s = a.budget_s or (120.0 if a.small else 420.0)
    a.batches = a.batches or list(SMALL_BATCHES if a.small else BATCHES)
    a.tok_batches = a.tok_batches or list(a.batches)
    a.steps = a.steps or (6 if a.small else 250)
    a.generator, a.tokenizer = (SMALL_GENERATOR, SMALL_TOKENIZER) if a.small else (GENERATOR, TOKENIZER)
    return a


class Budget:
    """Wall-clock caps: the whole run and the part in progress."""

    def __init__(self, total_s: float) -> None:
        self.start = time.monotonic()
        self.total_s = total_s
        self.part_end = self.start

    def begin(self, part: str) -> None:
        now = time.monotonic()
        self.part_end = min(now + SHARES[part] * self.total_s, self.start + self.total_s)

    def left(self) -> float:
        return self.part_end - time.monotonic()

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()


def estimate(prev: tuple[int, float] | None, batch: int) -> float:
    """The next batch's time from the last one: linear in rows above 32 (compute-bound), else the same
    (launch-bound); 0 when nothing ran yet (always try the first)."""
    if prev is None:
        return 0.0
    b0, s0 = prev
    return s0 * max(1.0, batch / max(b0, 32))


class Record:
    """The JSON of the run, rewritten after every row."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.data: dict[str, Any] = {"bench": "gpu_plan", "env": environment(device),
                                     "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                     "parts": {}, "rows": []}
        out = args.out
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.path = out if out.suffix == ".json" else out / f"gpu_plan_{device.type}_{stamp}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.save()
        if "skipped" in row:
            print(f"  {row['part']:<9} {row.get('op', ''):<9} {row.get('dtype', ''):<9} b{row['batch']:<4} skipped "
                  f"({row['skipped']})", flush=True)
            return
        mfu = f"  MFU {100 * row['mfu']:5.2f}%" if row.get("mfu") is not None else ""
        print(f"  {row['part']:<9} {row.get('op', ''):<9} {row.get('dtype', ''):<9} b{row['batch']:<4} "
              f"{row['seconds']:9.3f} s  {row['img_per_s']:9.2f} img/s{mfu}", flush=True)

    def part(self, name: str, **info: Any) -> None:
        self.data["parts"][name] = info
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


def _mfu(flop_per_img: float, img_per_s: float, peak_tflops: float | None) -> float | None:
    return None if not peak_tflops else flop_per_img * img_per_s / 1e12 / peak_tflops


# ------------------------------------------------------------------------------------------------ parts


def make_folders(args: argparse.Namespace, device: torch.device) -> tuple[Path, Path]:
    """Random-weight folders named as the registry names (so the generator pairs with its tokenizer by name)."""
    from models.hub import save_pretrained

    out = []
    for i, name in enumerate((args.tokenizer, args.generator)):
        folder = args.work / name
        if not (folder / "config.json").exists():
            model = build_model(name, device, seed=i)
            save_pretrained(model, folder, dtype=torch.bfloat16)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out.append(folder)
    return out[0], out[1]


async def engine_part(args: argparse.Namespace, folders: tuple[Path, Path], device: torch.device, budget: Budget,
                      rec: Record, peak: float | None) -> list[str]:
    """Every ``--dtypes`` in turn (sharing the part's cap); returns those that ran without error."""
    ok = []
    budget.begin("engine")
    for dtype in args.dtypes:
        if budget.left() < MIN_LOAD_S * (0.1 if args.small else 1.0):
            rec.part(f"engine-{dtype}", skipped="budget (no time left to load the models)")
            continue
        try:
            await _engine_dtype(args, folders, device, dtype, budget, rec, peak)
            ok.append(dtype)
        except Exception as e:  # one dtype failing (e.g. bf16 on some kernel) must not stop the next
            rec.part(f"engine-{dtype}-error", error=f"{type(e).__name__}: {e}")
            print(f"  engine {dtype} failed: {type(e).__name__}: {e}", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return ok


async def _engine_dtype(args: argparse.Namespace, folders: tuple[Path, Path], device: torch.device, dtype: str,
                        budget: Budget, rec: Record, peak: float | None) -> None:
    tok, gen = folders
    t0 = time.monotonic()
    async with EngineHarness([str(tok), str(gen)], device=str(device), dtype=dtype,
                             max_batch_size=max(args.batches), queue_capacity=max(256, max(args.batches))) as h:
        rec.part(f"engine-{dtype}", load_and_warmup_s=time.monotonic() - t0)
        name = next(n for n, s in h.engine.models.specs.items() if s.kind == "generator")
        spec = h.engine.models.specs[name]
        tspec = h.engine.models.specs[spec.tokenizer]
        flops = generation_flops(spec.config, tspec.config, "sde", args.steps, args.cfg_scale, *args.guidance)

        async def one(b: int) -> dict[str, Any]:
            r = await h.generate(name, b, args.steps, cfg_scale=args.cfg_scale, guidance=tuple(args.guidance),
                                 path_type=spec.defaults.get("path_type", "linear"))
            ips = b / r.wall_s
            return {"seconds": r.wall_s, "img_per_s": ips, "mfu": _mfu(flops.total, ips, peak),
                    "step_ms_median": 1e3 * sorted(r.periods_s)[len(r.periods_s) // 2] if r.periods_s else None,
                    "steps": args.steps, "model_rows_per_img": flops.rows, "tflop_per_img": flops.total / 1e12}

        await h.generate(name, 1, 3)  # first call at this path: allocator, cuBLAS handles
        await _sweep("engine", args.batches, budget, rec, one, op="generate", dtype=dtype)


async def _sweep(part: str, batches: list[int], budget: Budget, rec: Record,
                 run: Callable[[int], Awaitable[dict[str, Any]]], **labels: Any) -> None:
    """Run ``run(batch)`` over ``batches`` in order while each fits the part's cap (estimated from the last)."""
    prev: tuple[int, float] | None = None
    for b in batches:
        if not budget.fits(estimate(prev, b)):
            rec.add({"part": part, **labels, "batch": b, "skipped": "budget"})
            continue
        row = await run(b)
        rec.add({"part": part, **labels, "batch": b, **row})
        prev = (b, row["seconds"])


async def tokenizer_part(args: argparse.Namespace, folders: tuple[Path, Path], device: torch.device, budget: Budget,
                         rec: Record, peak: float | None) -> None:
    tok, _ = folders
    dtype = args.http_dtype
    async with EngineHarness([str(tok)], device=str(device), dtype=dtype, max_batch_size=max(args.tok_batches),
                             queue_capacity=max(256, max(args.tok_batches))) as h:
        name = next(iter(h.engine.models.specs))
        rt = h.runtime(name)
        spec = rt.spec
        s, (L, D) = spec.image_size, spec.token_shape
        for op in ("encode", "decode"):
            f = (softvq_encode_flops if op == "encode" else softvq_decode_flops)(spec.config)
            fn = rt.module.encode if op == "encode" else rt.module.decode

            async def one(b: int, op: str = op, f: float = f, fn: Any = fn) -> dict[str, Any]:
                g = torch.Generator().manual_seed(b)
                x = (torch.rand(b, 3, s, s, generator=g) * 2 - 1) if op == "encode" else torch.randn(b, L, D, generator=g)
                await h.tokenize(op, name, x)  # warm-up at this size
                wall = min([(await h.tokenize(op, name, x))[0] for _ in range(2)])
                xd = x.to(rt.device, rt.dtype)

                def bare() -> float:
                    with torch.inference_mode():
                        return measure(lambda: fn(xd), rt.device, warmup=1, repeats=3).median_ms / 1e3

                bare_s = await h.engine.device.run(bare)
                ips = b / wall
                return {"seconds": wall, "img_per_s": ips, "mfu": _mfu(f, ips, peak), "bare_seconds": bare_s,
                        "bare_img_per_s": b / bare_s, "bare_mfu": _mfu(f, b / bare_s, peak), "gflop_per_img": f / 1e9}

            if op == "encode":  # encode and decode share the part's cap
                budget.begin("tokenizer")
            await _sweep("tokenizer", args.tok_batches, budget, rec, one, op=op, dtype=dtype)


def http_part(args: argparse.Namespace, folders: tuple[Path, Path], device: torch.device, budget: Budget,
              rec: Record, peak: float | None) -> None:
    """The API server in its own process (``python -m server``), B concurrent one-image generate calls."""
    import httpx

    from models.hub import read_config
    from server.bench import LocalServer

    tok, gen = folders
    dtype = args.http_dtype
    biggest = max(args.batches)
    env = {"TOKSERVE_MODELS": f"{tok},{gen}", "TOKSERVE_DEVICE": str(device), "TOKSERVE_DTYPE": dtype,
           "TOKSERVE_MAX_BATCH_SIZE": str(biggest), "TOKSERVE_QUEUE_CAPACITY": str(max(256, biggest)),
           "TOKSERVE_MAX_STEPS": str(max(1000, args.steps))}
    flops = generation_flops(read_config(gen)[1], read_config(tok)[1], "sde", args.steps, args.cfg_scale,
                             *args.guidance)
    log_path = args.work / "server.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log, contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(LocalServer(env, ready_timeout_s=max(1.0, budget.left()), log=log))
        except RuntimeError as e:
            rec.part("http", ready=False, error=str(e), start_s=time.monotonic() - t0, dtype=dtype)
            print(f"  http: {e}; the server's log:\n{_tail(log_path)}", flush=True)
            return
        rec.part("http", ready=True, start_s=time.monotonic() - t0, dtype=dtype, port=server.port)
        with httpx.Client(base_url=server.url, timeout=None) as c:
            models = c.get("/v1/models").json()
        gen_name = next(m["name"] for m in _model_list(models) if m.get("kind") == "generator")
        body = {"model": gen_name, "cfg_scale": args.cfg_scale, "guidance_interval": list(args.guidance),
                "sampler": "sde", "format": "png"}
        asyncio.run(_http_generate(server.url, body, 1, 3))  # warm-up

        async def one(b: int) -> dict[str, Any]:
            wall, statuses = await _http_generate(server.url, body, b, args.steps)
            ips = b / wall
            return {"seconds": wall, "img_per_s": ips, "mfu": _mfu(flops.total, ips, peak), "statuses": statuses,
                    "steps": args.steps, "tflop_per_img": flops.total / 1e12}

        asyncio.run(_sweep("http", args.batches, budget, rec, one, op="generate", dtype=dtype))


def _model_list(payload: Any) -> list[dict[str, Any]]:
    return payload["models"] if isinstance(payload, dict) else payload


async def _http_generate(base: str, body: dict[str, Any], n: int, steps: int) -> tuple[float, dict[int, int]]:
    """``n`` concurrent ``POST /v1/generate`` of one image each (classes 0, 1, ..., seeds 0, 1, ...)."""
    import httpx

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as c:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(c.post("/v1/generate", json={**body, "steps": steps, "class": 1 + i % 2,
                                                                   "seed": i}) for i in range(n)))
        wall = time.perf_counter() - t0
    statuses: dict[int, int] = {}
    for r in rs:
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    return wall, statuses


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.dtypes = args.dtypes or (["bfloat16", "float32"] if device.type == "cuda" else ["float32"])
    args.work.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():  # this thread only: the engine's device thread runs under inference_mode itself
        return _run(args, device)


def _run(args: argparse.Namespace, device: torch.device) -> int:
    budget = Budget(args.budget_s)
    rec = Record(args, device)
    print(f"# gpu_plan on {rec.data['env']['device']} | torch {rec.data['env']['torch']} | budget {args.budget_s:.0f} s "
          f"| {args.generator} + {args.tokenizer}, {args.steps} SDE steps, cfg {args.cfg_scale} on {args.guidance}",
          flush=True)
    peak = None
    if "peak" in args.parts:
        budget.begin("peak")
        p = measure_peak(device, small=args.small)
        peak = p["tflops"]
        rec.part("peak", **p)
        print(f"  peak {peak:.3g} TFLOP/s ({p['note']})", flush=True)
    budget.begin("folders")
    t0 = time.monotonic()
    folders = make_folders(args, device)
    rec.part("folders", seconds=time.monotonic() - t0, tokenizer=str(folders[0]), generator=str(folders[1]))
    ran = asyncio.run(engine_part(args, folders, device, budget, rec, peak)) if "engine" in args.parts else []
    args.http_dtype = args.http_dtype or (ran or args.dtypes)[0]  # the server gets a dtype that worked in process
    if "tokenizer" in args.parts:
        try:
            asyncio.run(tokenizer_part(args, folders, device, budget, rec, peak))
        except Exception as e:  # a failed part must not lose the others
            rec.part("tokenizer-error", error=f"{type(e).__name__}: {e}")
            print(f"  tokenizer failed: {type(e).__name__}: {e}", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "http" in args.parts:
        budget.begin("http")
        try:
            http_part(args, folders, device, budget, rec, peak)
        except Exception as e:
            rec.part("http-error", error=f"{type(e).__name__}: {e}")
            print(f"  http failed: {type(e).__name__}: {e}", flush=True)
    rec.data["total_s"] = time.monotonic() - budget.start
    rec.save()
    print(f"wrote {rec.path} ({rec.data['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
