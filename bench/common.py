"""What every benchmark shares: timing, the environment record, random models, arguments and JSON output."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Milliseconds per call: median, 10th / 90th percentile, and every sample."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    samples_ms: list[float] = field(default_factory=list)
    clock: str = "perf_counter"

    @classmethod
    def of(cls, samples_ms: Sequence[float], clock: str) -> Timing:
        s = sorted(samples_ms)
        q = lambda f: s[min(len(s) - 1, max(0, round(f * (len(s) - 1))))]  # noqa: E731
        return cls(statistics.median(s), q(0.1), q(0.9), list(samples_ms), clock)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 3, repeats: int = 10) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones. On CUDA each call sits between
    two CUDA events (device time, launch gaps included); elsewhere between a synchronize and a
    ``time.perf_counter`` read."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return Timing.of(samples, "cuda-events")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing.of(samples, "perf_counter")


# ------------------------------------------------------------------------------------------ environment


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    return dev


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, torch / CUDA versions, date (UTC), host and commit of a run."""
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "commit": _git_commit(),
        "device_type": device.type,
        "load_average": _load_average(),  # 1, 5, 15 min: how busy the machine was (CPU figures depend on it)
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env.update(device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"{torch.get_num_threads()} torch threads)")
    return env


# --------------------------------------------------------------------------------------------- models


def enliven_(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """:func:`models.random_init.enliven` from its own generator seeded ``seed``, so benchmark weights are
    reproducible (and fp32-versus-fast-path errors are not trivially 0)."""
    from models.random_init import enliven

    return enliven(module, std, torch.Generator(device="cpu").manual_seed(seed))


def build_model(name: str, device: torch.device, seed: int = 0, **overrides: Any) -> nn.Module:
    """A registry model with seeded random (enlivened) weights, initialised directly on ``device``, eval."""
    import models

    torch.manual_seed(seed)
    with torch.device(device):
        model = models.create_model(name, **overrides)
    enliven_(model, seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max |out - ref|, and ||out - ref|| / ||ref|| (float64, on the CPU)."""
    a, b = out.detach().double().cpu(), ref.detach().double().cpu()
    diff = a - b
    return {"err_max_abs": float(diff.abs().max()),
            "err_rel": float(diff.norm() / b.norm().clamp_min(1e-30)),
            "finite": bool(torch.isfinite(a).all())}


# ------------------------------------------------------------------------------------------ arguments


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def common_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    p.add_argument("--small", action="store_true", help="tiny configurations (CPU smoke run, under a minute)")
    p.add_argument("--variants", type=str_list, default=None,
                   help="fast-path variants: precision[+compile|+dyn|+autotune][+graphs][+cl][+math], "
                        "precision one of fp32, tf32, bf16-autocast, bf16, fp16")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (the median is reported)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the MFU denominator; default: measure (bench.peak) at start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 with --small on the CPU, else torch's default)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder (or .json file) for the raw results")
    return p


@contextlib.contextmanager
def session(args: argparse.Namespace) -> Iterator[torch.device]:
    """Resolve the device, set CPU threads (1 for ``--small`` on the CPU: a loaded 2-core box runs tiny
    models several times faster single-threaded) and turn autograd off; both restored on exit."""
    device = resolve_device(args.device)
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    want = args.threads or (1 if args.small and device.type == "cpu" else None)
    try:
        if want:
            torch.set_num_threads(want)
        torch.set_grad_enabled(False)
        yield device
    finally:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)


def peak_for(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from bench.peak import measure_peak

    if args.peak_tflops is not None:
        return {"tflops": args.peak_tflops, "dtype": "given", "n": None, "note": "--peak-tflops"}
    return measure_peak(device, small=args.small)


# --------------------------------------------------------------------------------------------- output


def write_json(record: dict[str, Any], out: Path, bench: str, device: torch.device) -> Path:
    """Write ``record`` to ``out`` (a .json path, or a folder: ``{bench}_{device}_{UTC stamp}.json``)."""
    if out.suffix == ".json":
        path = out
    else:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        path = out / f"{bench}_{device.type}_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=_jsonable))
    return path


def _jsonable(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, torch.dtype | torch.device | Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
