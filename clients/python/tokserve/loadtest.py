"""Load tester for a tokserve server (``tokserve bench``).

Modes:

* **closed loop**: ``concurrency`` workers, each sends its next request when the previous one answers;
* **open loop**: requests arrive as a Poisson process at ``rate`` per second whatever the server does
  (latency counts from the scheduled arrival, so a slow server cannot hide its queueing);
* **sweep**: open-loop runs at rising rates to find the highest rate whose p99 latency stays under a target
  (with at most ``max_error_rate`` errors): doubling until a rate fails, then bisecting.

Each run sends a weighted mix of operations (``encode``, ``decode``, ``generate`` with their own parameters),
discards a warm-up, stops by itself after ``requests`` requests or ``duration`` seconds, and reports
throughput (req/s, images/s), p50/p90/p99/max latency, queue versus compute time (from the ``x-queue-time``
and ``x-compute-time`` headers) and errors by status. Only the URL given is ever contacted.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from . import __version__
from ._bench_stats import RequestRecord, format_table, summarise
from .async_client import AsyncClient
from .errors import APIConnectionError, DeadlineExceededError, TokserveError

OPS = ("encode", "decode", "generate")


@dataclass(frozen=True)
class OpSpec:
    """One entry of the operation mix: ``op`` with relative ``weight`` and request ``params``.

    Params: encode ``model``, ``preprocess``, ``batch`` (images per request); decode ``model``, ``format``,
    ``batch`` (token rows per request); generate: the keyword arguments of ``Client.generate``
    (``class_id``, ``num_images``, ``cfg_scale``, ``guidance_interval``, ``steps``, ``sampler``, ``seed``, ``model``).
    """

    op: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> OpSpec:
        """Parse ``op[:weight][:key=value,key=value]``, e.g. ``generate:2:class_id=207,steps=8``.

        ``guidance_interval`` takes ``low/high``; numbers and ``true``/``false`` are converted.
        """
        parts = text.split(":", 2)
        op = parts[0].strip()
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r} in mix {text!r}; choose from {OPS}")
        weight = float(parts[1]) if len(parts) > 1 and parts[1].strip() else 1.0
        if weight <= 0:
            raise ValueError(f"mix weight must be positive: {text!r}")
        params: dict[str, Any] = {}
        if len(parts) > 2 and parts[2].strip():
            for item in parts[2].split(","):
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"mix parameter {item!r} is not key=value (in {text!r})")
                params[key.strip()] = _convert(key.strip(), value.strip())
        return cls(op, weight, params)


@dataclass
class BenchConfig:
    """Everything one ``tokserve bench`` invocation does; see the command's ``--help``."""

    url: str
    mode: str = "closed"
    mix: list[OpSpec] = field(
        default_factory=lambda: [OpSpec("encode"), OpSpec("decode"), OpSpec("generate")]
    )
    concurrency: int = 8
    rate: float = 10.0
    requests: int | None = 200
    duration: float | None = None
    warmup: int = 10
    timeout: float = 60.0
    retries: int = 0
    max_in_flight: int = 512
    seed: int = 0
    image: str | None = None
    api_key: str | None = None
    p99_target_ms: float = 1000.0
    max_error_rate: float = 0.01
    sweep_rates: list[float] | None = None
    sweep_factor: float = 2.0
    sweep_max_rate: float = 1000.0
    sweep_refine: int = 2

    def validate(self) -> None:
        if self.mode not in ("closed", "open", "sweep"):
            raise ValueError(f"mode must be closed, open or sweep; got {self.mode!r}")
        if self.requests is None and self.duration is None:
            raise ValueError("give a bound: requests or duration (a load test must stop by itself)")
        if self.requests is not None and self.requests <= 0:
            raise ValueError("requests must be positive")
        if self.concurrency <= 0 or self.rate <= 0:
            raise ValueError("concurrency and rate must be positive")
        if not self.mix:
            raise ValueError("the operation mix is empty")


# --------------------------------------------------------------------------------------------- payloads
@dataclass
class Payloads:
    """Inputs prepared once before the run: an image to encode and real latents to decode."""

    image: bytes
    latents: np.ndarray  # (1, L, D), from encoding ``image``
    latents_model: str | None


def synthetic_image(size: int, seed: int = 0) -> bytes:
    """A deterministic ``size x size`` RGB PNG (smooth gradients plus noise), for encode requests."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 200.0
    pixels = np.clip(base + rng.normal(0.0, 20.0, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


async def prepare_payloads(client: AsyncClient, config: BenchConfig) -> Payloads:
    """Read ``/v1/models``; build or load the encode image; encode it once to get latents for decode."""
    models = await client.models()
    enc_model = next(
        (s.params.get("model") for s in config.mix if s.op == "encode" and "model" in s.params), None
    )
    dec_model = next(
        (s.params.get("model") for s in config.mix if s.op == "decode" and "model" in s.params), None
    )
    tok_name = dec_model or enc_model or models.default_tokenizer
    if config.image:
        image = Path(config.image).read_bytes()
    else:
        size = next((m.image_size for m in models.models if m.name == tok_name and m.image_size), None) or 64
        image = synthetic_image(int(size), config.seed)
    latents = await client.encode(image, model=tok_name)
    return Payloads(image=image, latents=latents.array[:1], latents_model=latents.model or tok_name)


# --------------------------------------------------------------------------------------------- one request
async def run_one(client: AsyncClient, spec: OpSpec, payloads: Payloads, start: float) -> RequestRecord:
    """Send one request of ``spec``; never raises (failures become records with their status)."""
    p = dict(spec.params)
    try:
        if spec.op == "encode":
            batch = int(p.pop("batch", 1))
            res = await client.encode([payloads.image] * batch, **p)
            images, timings = len(res), res.timings
        elif spec.op == "decode":
            batch = int(p.pop("batch", 1))
            p.setdefault("model", payloads.latents_model)
            dres = await client.decode_result(np.repeat(payloads.latents, batch, axis=0), **p)
            images, timings = len(dres.images), dres.timings
        else:
            p.setdefault("class_id", 1)
            gres = await client.generate(**p)
            images, timings = len(gres.images), gres.timings
    except DeadlineExceededError as exc:
        return RequestRecord(spec.op, start, time.perf_counter(), exc.status or "timeout")
    except APIConnectionError:
        return RequestRecord(spec.op, start, time.perf_counter(), "connection")
    except TokserveError as exc:
        return RequestRecord(spec.op, start, time.perf_counter(), exc.status or "error")
    return RequestRecord(
        spec.op,
        start,
        time.perf_counter(),
        200,
        images,
        timings.queue_ms,
        timings.compute_ms,
        timings.total_ms,
    )


class _Picker:
    """Weighted random choice over the mix, seeded for reproducible sequences."""

    def __init__(self, mix: Sequence[OpSpec], seed: int) -> None:
        self.mix = list(mix)
        self.weights = [s.weight for s in self.mix]
        self.rng = random.Random(seed)

    def __call__(self) -> OpSpec:
        return self.rng.choices(self.mix, weights=self.weights, k=1)[0]


# --------------------------------------------------------------------------------------------- loops
async def closed_loop(
    client: AsyncClient,
    payloads: Payloads,
    mix: Sequence[OpSpec],
    *,
    concurrency: int,
    requests: int | None,
    duration: float | None,
    seed: int,
) -> tuple[list[RequestRecord], float]:
    """``concurrency`` workers back to back until ``requests`` were sent or ``duration`` passed."""
    pick, records = _Picker(mix, seed), []
    started = time.perf_counter()
    deadline = started + duration if duration is not None else float("inf")
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while time.perf_counter() < deadline and (requests is None or issued < requests):
            issued += 1
            records.append(await run_one(client, pick(), payloads, time.perf_counter()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, started


def poisson_arrivals(rate: float, *, count: int | None, duration: float | None, seed: int) -> list[float]:
    """Arrival offsets (seconds from the start) of a Poisson process at ``rate``/s, bounded by both limits."""
    rng = np.random.default_rng(seed)
    limit = count if count is not None else int(rate * (duration or 0) * 3 + 100)
    offsets = np.cumsum(rng.exponential(1.0 / rate, size=limit))
    if duration is not None:
        offsets = offsets[offsets < duration]
    return offsets.tolist()


async def open_loop(
    client: AsyncClient,
    payloads: Payloads,
    mix: Sequence[OpSpec],
    *,
    rate: float,
    requests: int | None,
    duration: float | None,
    seed: int,
    max_in_flight: int,
) -> tuple[list[RequestRecord], float]:
    """Poisson arrivals at ``rate``/s; an arrival finding ``max_in_flight`` requests pending is ``dropped``."""
    pick, records = _Picker(mix, seed), []
    arrivals = poisson_arrivals(rate, count=requests, duration=duration, seed=seed)
    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()

    async def one(spec: OpSpec, due: float) -> None:
        records.append(await run_one(client, spec, payloads, due))

    for offset in arrivals:
        due = started + offset
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        spec = pick()
        if len(tasks) >= max_in_flight:
            records.append(RequestRecord(spec.op, due, time.perf_counter(), "dropped"))
            continue
        task = asyncio.create_task(one(spec, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return records, started


# --------------------------------------------------------------------------------------------- sweep
def passes(summary: dict, p99_target_ms: float, max_error_rate: float) -> bool:
    """Whether a run met the target: some successes, p99 under the target, errors under the limit."""
    p99 = summary["latency_ms"]["p99"]
    return (
        summary["ok"] > 0
        and p99 is not None
        and p99 <= p99_target_ms
        and summary["error_rate"] <= max_error_rate
    )


async def find_max_rate(
    run_at: Callable[[float], Awaitable[dict]],
    ok: Callable[[dict], bool],
    *,
    start: float,
    factor: float = 2.0,
    max_rate: float = 1000.0,
    refine: int = 2,
    rates: Sequence[float] | None = None,
) -> tuple[float | None, list[dict]]:
    """Search the highest passing rate; returns ``(best rate or None, every run's summary)``.

    With ``rates``: try each (ascending) and stop at the first failure. Otherwise multiply ``start`` by
    ``factor`` until a rate fails or ``max_rate`` is passed, then bisect ``refine`` times between the best
    passing and the first failing rate.
    """
    points: list[dict] = []
    best: float | None = None
    bad: float | None = None

    async def attempt(r: float) -> bool:
        summary = await run_at(r)
        summary["passed"] = ok(summary)
        points.append(summary)
        return summary["passed"]

    for r in sorted(rates) if rates else _geometric(start, factor, max_rate):
        if await attempt(r):
            best = r
        else:
            bad = r
            break
    if not rates and bad is not None:
        low = best if best is not None else 0.0
        for _ in range(refine):
            mid = (low + bad) / 2
            if mid <= 0:
                break
            if await attempt(mid):
                best = low = mid
            else:
                bad = mid
    return best, points


def _geometric(start: float, factor: float, max_rate: float) -> list[float]:
    out, r = [], start
    while r <= max_rate * (1 + 1e-9):
        out.append(r)
        r *= factor
    return out


# --------------------------------------------------------------------------------------------- driver
async def run_bench(config: BenchConfig, *, log: Callable[[str], None] = print) -> dict:
    """Run the configured load test and return the report (a JSON-ready dict)."""
    config.validate()
    limits = httpx.Limits(max_connections=max(config.concurrency, config.max_in_flight) + 8)
    http = httpx.AsyncClient(base_url=config.url.rstrip("/"), timeout=config.timeout, limits=limits)
    client = AsyncClient(
        config.url,
        api_key=config.api_key,
        timeout=config.timeout,
        max_retries=config.retries,
        http_client=http,
        seed=config.seed,
    )
    try:
        payloads = await prepare_payloads(client, config)
        models = (await client.models()).names
        if config.warmup:
            log(f"warm-up: {config.warmup} requests")
            await closed_loop(
                client,
                payloads,
                config.mix,
                concurrency=min(config.concurrency, config.warmup),
                requests=config.warmup,
                duration=None,
                seed=config.seed + 1,
            )
        best: float | None = None
        if config.mode == "closed":
            records, started = await closed_loop(
                client,
                payloads,
                config.mix,
                concurrency=config.concurrency,
                requests=config.requests,
                duration=config.duration,
                seed=config.seed,
            )
            runs = [
                summarise(
                    records, started=started, label={"mode": "closed", "concurrency": config.concurrency}
                )
            ]
        elif config.mode == "open":
            runs = [await _open_run(client, payloads, config, config.rate)]
        else:

            async def run_at(rate: float) -> dict:
                summary = await _open_run(client, payloads, config, rate)
                log(format_table([summary]).splitlines()[-1])
                return summary

            best, runs = await find_max_rate(
                run_at,
                lambda s: passes(s, config.p99_target_ms, config.max_error_rate),
                start=config.rate,
                factor=config.sweep_factor,
                max_rate=config.sweep_max_rate,
                refine=config.sweep_refine,
                rates=config.sweep_rates,
            )
    finally:
        await client.aclose()
        await http.aclose()
    report = {
        "tool": f"tokserve bench {__version__}",
        "url": config.url,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "server_models": models,
        "config": _config_json(config),
        "runs": runs,
        "sweep": None,
    }
    if config.mode == "sweep":
        report["sweep"] = {
            "p99_target_ms": config.p99_target_ms,
            "max_error_rate": config.max_error_rate,
            "best_rate": best,
            "rates": [s["rate"] for s in runs],
            "passed": [s["passed"] for s in runs],
        }
    return report


async def _open_run(client: AsyncClient, payloads: Payloads, config: BenchConfig, rate: float) -> dict:
    records, started = await open_loop(
        client,
        payloads,
        config.mix,
        rate=rate,
        requests=config.requests,
        duration=config.duration,
        seed=config.seed,
        max_in_flight=config.max_in_flight,
    )
    return summarise(records, started=started, label={"mode": "open", "rate": rate})


def write_report(
    report: dict, json_path: str | Path, png_path: str | Path | None
) -> tuple[Path, Path | None]:
    """Write the report as JSON and (unless ``png_path`` is None) the latency/throughput plot."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png = None
    if png_path is not None:
        from ._bench_plot import plot_report  # matplotlib only when a plot is wanted

        target = report["sweep"]["p99_target_ms"] if report.get("sweep") else None
        title = f"tokserve bench: {report['url']} ({report['config']['mode']}) on {report['machine']['cpu']}"
        png = plot_report(report["runs"], png_path, p99_target_ms=target, title=title)
    return json_path, png


def machine_info() -> dict[str, Any]:
    """Where the load generator ran (the server may be elsewhere)."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def _config_json(config: BenchConfig) -> dict[str, Any]:
    out = asdict(config)
    out.pop("api_key", None)
    return out


def _convert(key: str, value: str) -> Any:
    if key == "guidance_interval":
        low, _, high = value.partition("/")
        return (float(low), float(high))
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
