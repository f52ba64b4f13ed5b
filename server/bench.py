"""Serving benchmark: images/s for encode, decode and generate at several concurrencies, with batching on
(``max_batch_size`` > 1) and off (``max_batch_size`` = 1), and the batching gain.

    python -m server.bench                                   # the configured models (TOKSERVE_MODELS / default)
    python -m server.bench --models softvq-tiny-64,sit-tiny-64x32 --steps 10
    python -m server.bench --url http://gpu-box:8000         # a running server, as it is configured
    python -m server.bench --models softvq-tiny-64,sit-tiny-64x32,mar-tiny-64x32 --ops generate --generators all

Without ``--url`` it starts ``python -m server`` twice on free ports (batching on, then off) with the same
settings otherwise. Each measurement is closed-loop: ``c`` clients send requests back to back until
``--requests`` requests have completed; one request is one image. Real Tiny ImageNet JPEGs are used as
encode inputs when ../shared/data is present, else random images. ``--generators`` measures generate for
several loaded generators (SiT, DiT, MAR, MaskGIT, VAR alike), each in its own table row.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "tiny-imagenet-64" / "validation-00000-of-00001.parquet"
OPS = ("encode", "decode", "generate")


@dataclass
class Workload:
    jpegs: list[bytes]
    tokens_npy: bytes
    classes: dict[str, list[int]]  # generator -> its served classes
    steps: int | None


def _images(n: int, size: int) -> list[bytes]:
    if DATA.exists():
        import pyarrow.parquet as pq

        batch = next(pq.ParquetFile(DATA).iter_batches(batch_size=n, columns=["image"]))
        return [row["bytes"] for row in batch.column("image").to_pylist()]
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


async def _prepare(client: Any, steps: int | None) -> Workload:
    info = (await client.get("/v1/models")).json()
    by = {m["name"]: m for m in info["models"]}
    tok = by[info["default_tokenizer"]]
    jpegs = _images(64, tok["image_size"])
    r = await client.post("/v1/encode", content=jpegs[0], headers={"content-type": "image/jpeg",
                                                                    "accept": "application/x-npy"})
    r.raise_for_status()
    classes = {m["name"]: list(m["classes"]) for m in info["models"] if m["kind"] == "generator"}
    return Workload(jpegs, r.content, classes, steps)


def _request(op: str, w: Workload, i: int) -> dict[str, Any]:
    """``op`` is encode, decode or generate:<generator>."""
    if op == "encode":
        return {"url": "/v1/encode", "content": w.jpegs[i % len(w.jpegs)], "headers": {"content-type": "image/jpeg"}}
    if op == "decode":
        return {"url": "/v1/decode", "content": w.tokens_npy, "headers": {"content-type": "application/x-npy"}}
    model = op.split(":", 1)[1]
    classes = w.classes[model]
    body: dict[str, Any] = {"model": model, "class": classes[i % len(classes)], "seed": i}
    if w.steps is not None:
        body["steps"] = w.steps
    return {"url": "/v1/generate", "json": body, "headers": {"accept": "image/png"}}


async def measure(url: str, op: str, concurrency: int, requests: int, w: Workload, timeout: float = 600) -> float:
    """Images per second for ``requests`` requests of ``op`` sent by ``concurrency`` closed-loop clients."""
    import httpx

    counter = iter(range(requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            r = await client.post(**_request(op, w, i))
            r.raise_for_status()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        (await client.post(**_request(op, w, 0))).raise_for_status()  # warm-up, not timed
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return requests / (time.perf_counter() - t0)


async def run_all(url: str, ops: Sequence[str], concurrencies: Sequence[int], requests: dict[str, int],
                  steps: int | None, generators: str = "default") -> dict[tuple[str, int], float]:
    """``generators``: ``default`` (the server's default generator), ``all``, or comma-separated names."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        w = await _prepare(client, steps)
        default = (await client.get("/v1/models")).json()["default_generator"]
    if generators == "default":
        gens = [default] if default else []
    elif generators == "all":
        gens = list(w.classes)
    else:
        gens = [g for g in generators.split(",") if g]
        unknown = sorted(set(gens) - set(w.classes))
        if unknown:
            raise SystemExit(f"not loaded: {unknown}; loaded generators: {sorted(w.classes)}")
    expanded = [x for op in ops for x in ([f"generate:{g}" for g in gens] if op == "generate" else [op])]
    out = {}
    for op in expanded:
        for c in concurrencies:
            out[(op, c)] = await measure(url, op, c, max(requests[op.split(":")[0]], c), w)
            print(f"  {op:<9} c={c:<3} {out[(op, c)]:9.2f} images/s", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``python -m server`` in a subprocess with extra environment; a context manager."""

    def __init__(self, env: dict[str, str], *, ready_timeout_s: float = 600.0, log: IO[bytes] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the repository first, then what the caller's path holds (e.g. wheels installed with --target)
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "PYTHONPATH": path, **env}
        self.env.pop("REDIS_URL", None)
        self.ready_timeout_s = ready_timeout_s
        self.log = log  # where the server's output goes (default: this process's)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalServer:
        import httpx

        self.proc = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--log-level", "warning"], cwd=REPO, env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT if self.log else None)
        end = time.time() + self.ready_timeout_s
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.__exit__()
        raise RuntimeError(f"server not ready after {self.ready_timeout_s:.0f} s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ---------------------------------------------------------------------------------------------- output


def table(results: dict[str, dict[tuple[str, int], float]]) -> str:
    """A Markdown table: one row per (op, concurrency), one column per configuration, and the gain."""
    configs = list(results)
    keys = sorted({k for r in results.values() for k in r}, key=lambda k: (OPS.index(k[0].split(":")[0]), k[0], k[1]))
    head = ["op", "concurrency"] + [f"{c} (img/s)" for c in configs]
    gain = len(configs) == 2
    if gain:
        head.append(f"gain ({configs[0]} / {configs[1]})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        vals = [results[c].get(k) for c in configs]
        row = [k[0], str(k[1])] + [f"{v:.2f}" if v is not None else "-" for v in vals]
        if gain:
            row.append(f"{vals[0] / vals[1]:.2f}x" if vals[0] and vals[1] else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="benchmark a running server (as configured) instead of starting two")
    p.add_argument("--models", help="TOKSERVE_MODELS for the started servers (default: env / shipped)")
    p.add_argument("--device", help="TOKSERVE_DEVICE for the started servers")
    p.add_argument("--max-batch-size", type=int, default=32, help="batching-on setting (off is 1)")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--concurrency", default="1,32", help="comma-separated client counts")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--requests", type=int, default=64, help="requests per encode/decode measurement")
    p.add_argument("--generate-requests", type=int, default=32, help="requests per generate measurement")
    p.add_argument("--steps", type=int, help="denoising steps (default: each generator's)")
    p.add_argument("--generators", default="default",
                   help="generators to measure: default, all, or comma-separated names")
    p.add_argument("--torch-threads", type=int)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    ops = [o for o in args.ops.split(",") if o]
    requests = {"encode": args.requests, "decode": args.requests, "generate": args.generate_requests}

    def run(url: str) -> dict[tuple[str, int], float]:
        return asyncio.run(run_all(url, ops, concurrencies, requests, args.steps, args.generators))

    results: dict[str, dict[tuple[str, int], float]] = {}
    if args.url:
        results["server"] = run(args.url.rstrip("/"))
    else:
        base = {"TOKSERVE_MAX_WAIT_MS": str(args.max_wait_ms), "TOKSERVE_QUEUE_CAPACITY": "4096"}
        for flag, key in ((args.models, "TOKSERVE_MODELS"), (args.device, "TOKSERVE_DEVICE"),
                          (args.torch_threads, "TOKSERVE_TORCH_THREADS")):
            if flag is not None:
                base[key] = str(flag)
        runs: list[tuple[str, Callable[[], dict[str, str]]]] = [
            (f"batching on (max_batch_size={args.max_batch_size})",
             lambda: {**base, "TOKSERVE_MAX_BATCH_SIZE": str(args.max_batch_size)}),
            ("batching off (max_batch_size=1)", lambda: {**base, "TOKSERVE_MAX_BATCH_SIZE": "1"}),
        ]
        for name, env in runs:
            print(f"{name}:", file=sys.stderr, flush=True)
            with LocalServer(env()) as server:
                results[name] = run(server.url)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
