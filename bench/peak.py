"""The MFU denominator: the measured rate of one large matmul.

    python -m bench.peak                 # CUDA: 8192^3 bf16 torch.mm on random data (issue 10: 686 TFLOP/s)
    python -m bench.peak --device cpu    # CPU: a float32 matmul (2048^3; 512^3 with --small), said so

The CPU figure is float32 because CPU bf16 matmuls are not the fast path there; every CPU MFU is therefore
against the CPU's float32 matmul rate.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from bench.common import common_parser, environment, measure, session, write_json


def measure_peak(device: torch.device, *, small: bool = False, n: int | None = None, repeats: int = 10,
                 seed: int = 0) -> dict[str, Any]:
    """{"tflops", "dtype", "n", "median_ms", "note"} of an n x n x n matmul on fresh random operands."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = n or (8192 if cuda else (512 if small else 2048))
    g = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = measure(lambda: torch.mm(a, b, out=out), device, warmup=3, repeats=repeats)
    tflops = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
    note = f"{n}^3 {str(dtype).removeprefix('torch.')} torch.mm, median of {repeats} ({t.clock})"
    if not cuda:
        note += "; CPU: float32 matmul rate, not a bf16 tensor-core peak"
    return {"tflops": tflops, "dtype": str(dtype).removeprefix("torch."), "n": n, "median_ms": t.median_ms,
            "note": note}


def main(argv: list[str] | None = None) -> int:
    p = common_parser("Measure the matmul peak (the MFU denominator).")
    p.add_argument("--n", type=int, default=None, help="matrix size (default 8192 on CUDA)")
    args = p.parse_args(argv)
    with session(args) as device:
        peak = measure_peak(device, small=args.small, n=args.n, repeats=args.repeats or 10, seed=args.seed)
        env = environment(device)
    print(f"# {env['device']} | torch {env['torch']} | {env['date']}")
    print(f"matmul peak: {peak['tflops']:.1f} TFLOP/s ({peak['note']}); issue 10 reference: 686 TFLOP/s bf16 "
          "on the lent H100")
    path = write_json({"bench": "peak", "env": env, "peak": peak}, args.out, "peak", device)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
