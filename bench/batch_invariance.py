"""Batch invariance of the shipped default models on this CPU, and what making it hold costs.

    python -m bench.batch_invariance [--threads 2] [--batches 8,32] [--repeat 3]

1. Probe: the same rows run alone (batch 1) and inside batches of 4 / 32 through the tokenizer's encode and
   decode and the generator's forward; prints the largest difference per layer output (forward hooks), so the
   layers whose CPU kernels change with the batch size show up.
2. Cost: encode / decode / generator forward at each batch size as one call, as per-row calls (chunks of 1),
   and padded to a fixed bucket of 8 rows (pad rows computed and dropped); prints ms per call and the ratio.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import models
from server.settings import DEFAULT_WEIGHTS


def _hooks(module: torch.nn.Module, store: dict[str, torch.Tensor]) -> list:
    def hook(name: str):
        def fn(_m, _inp, out):
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                store[name] = out.detach().clone()
        return fn
    return [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if n and not list(m.children())]


def probe(name: str, module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], row: torch.Tensor,
          batches: list[int]) -> None:
    alone: dict[str, torch.Tensor] = {}
    hs = _hooks(module, alone)
    with torch.inference_mode():
        y1 = fn(row)
    for h in hs:
        h.remove()
    for b in batches:
        got: dict[str, torch.Tensor] = {}
        hs = _hooks(module, got)
        with torch.inference_mode():
            yb = fn(row.expand(b, *row.shape[1:]).contiguous())
        for h in hs:
            h.remove()
        first = next((n for n in alone if n in got and got[n].shape[0] % b == 0 and not torch.equal(
            alone[n], got[n][: alone[n].shape[0]])), None)
        diff = float((yb[:1] - y1).abs().max())
        rows_differ = sum(not torch.equal(yb[i:i + 1], y1) for i in range(b))
        print(f"  {name:28s} batch {b:3d}: max |out(b) - out(1)| = {diff:.3g}; rows differing {rows_differ}/{b}; "
              f"first differing layer: {first}")


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def per_row(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])


def padded(fn: Callable[[torch.Tensor], torch.Tensor], bucket: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for s in range(0, x.shape[0], bucket):
            c = x[s:s + bucket]
            n = c.shape[0]
            if n < bucket:
                c = torch.cat([c, c[:1].expand(bucket - n, *c.shape[1:])])
            outs.append(fn(c)[:n])
        return torch.cat(outs)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--bucket", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    tok = models.load_pretrained(DEFAULT_WEIGHTS / "tokenizer").eval()
    gen = models.load_pretrained(DEFAULT_WEIGHTS / "generator").eval()
    s = tok.config.image_size
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, s, s, generator=g) * 2 - 1
    with torch.inference_mode():
        codes = tok.encode(img)  # (1, L, D) float tokens
    L, D = gen.config.num_tokens, gen.config.token_dim
    x = torch.randn(1, L, D, generator=g)

    def gen_fn(z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        return gen(z, torch.full((n,), 0.37), torch.full((n,), 1, dtype=torch.long))

    calls = {"encode": (tok, tok.encode, img), "decode": (tok, tok.decode, codes),
             "generator forward": (gen, gen_fn, x)}
    print(f"torch {torch.__version__}, {args.threads} threads; tokenizer {type(tok).__name__}, "
          f"generator {type(gen).__name__}")
    print("1. probe: row alone vs the same row repeated in a batch")
    for name, (mod, fn, row) in calls.items():
        probe(name, mod, fn, row, [4] + batches)
    print(f"2. cost (best of {args.repeat}, ms per call of the whole batch)")
    for name, (_mod, fn, row) in calls.items():
        for b in batches:
            xb = row.expand(b, *row.shape[1:]).contiguous()
            with torch.inference_mode():
                one = timed(lambda fn=fn, xb=xb: fn(xb), args.repeat)
                rows = timed(lambda fn=fn, xb=xb: per_row(fn)(xb), args.repeat)
                pad = timed(lambda fn=fn, xb=xb: padded(fn, args.bucket)(xb), args.repeat)
                b1 = timed(lambda fn=fn, xb=xb: fn(xb[:1]), args.repeat)
                p1 = timed(lambda fn=fn, xb=xb: padded(fn, args.bucket)(xb[:1]), args.repeat)
            print(f"  {name:18s} batch {b:3d}: one call {one:8.1f} | per-row {rows:8.1f} ({rows / one:4.2f}x) | "
                  f"bucket {args.bucket} {pad:8.1f} ({pad / one:4.2f}x) || batch 1: {b1:6.1f}, "
                  f"padded to {args.bucket}: {p1:6.1f} ({p1 / b1:4.2f}x)")


if __name__ == "__main__":
    main()
