"""The server's engine, in process and without HTTP, instrumented for benchmarks.

:class:`EngineHarness` starts the real :class:`server.engine.engine.Engine` (the same settings, model loading,
warm-up, ``BatchLoop`` / ``GenerateLoop``, scheduler, step samplers and runtimes the API server runs) on an
:class:`InProcessQueue`, and submits jobs the way the HTTP handlers do (one :class:`Job` per request). Two
probes watch it without changing what it runs:

* the queue records when the generation loop reports progress: the loop reports once per step, so the gaps
  between reports are the loop's period per step (queue take, cancellation checks, the hop to the device
  thread, the scheduler's step, the sampler, the runtime, progress reporting);
* forward hooks on each served module record the time spent inside the model's ``forward`` (on the CPU this
  is the model's own compute; on CUDA it is only the launch time, so GPU benchmarks use wall-clock rates);
* the engine's own step timer (the scheduler's timing of each sampler step, which the loop observes into
  ``tokserve_denoise_step_seconds``) is copied as it is observed; it splits a period into the sampler's step (guidance packing, sampler arithmetic, runtime, forward) and
  the loop around it (queue, asyncio, the device-thread hop, progress reports).

    async with EngineHarness(["weights/default/tokenizer", "sit-tiny-64x32"], device="cpu") as h:
        run = await h.generate("sit-tiny-64x32", rows=8, steps=6)
        print(run.periods_s, h.forward_s["sit-tiny-64x32"])
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from models.sampling.base import SampleRequest
from server.queue.base import DecodePayload, EncodePayload, GeneratePayload, Job, JobResult, Progress
from server.queue.memory import InProcessQueue


class _TimedQueue(InProcessQueue):
    """The in-process queue, with the time of every progress report kept per job kind."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reports: dict[str, list[float]] = {}

    async def progress(self, updates: Sequence[Progress]) -> None:
        now = time.perf_counter()
        for kind in {u.job.kind for u in updates}:
            self.reports.setdefault(kind, []).append(now)
        await super().progress(updates)


@dataclass
class GenerateRun:
    """One batch of generation jobs through the engine: ``wall_s`` from submission to the last result,
    ``periods_s`` the loop's steady-state period per step (the first step, with admission, and the last, with
    the decode, left out), ``forward_s`` the in-model forward times during those steps (CPU only)."""

    rows: int
    steps: int
    wall_s: float
    periods_s: list[float]
    forward_s: list[float]
    model_rows: list[int] = field(default_factory=list)
    sampler_step_s: list[float] = field(default_factory=list)  # the scheduler's timer, the same steps
    together: bool = True  # every job joined at the first step (one progress report per step)


class EngineHarness:
    """``entries`` are ``TOKSERVE_MODELS`` entries (folders or registry names); ``settings`` are further
    :class:`server.settings.Settings` fields (``max_batch_size``, ``dtype`` ...)."""

    def __init__(self, entries: Sequence[str], *, device: str = "cpu", **settings: Any) -> None:
        from server.settings import Settings

        self.settings = Settings(models=list(entries), device=device, **settings)
        self.queue = _TimedQueue(self.settings.queue_capacity * 4)
        self.forward_s: dict[str, list[float]] = {}
        self.forward_rows: dict[str, list[int]] = {}
        self.engine: Any = None
        self.metrics: Any = None
        self._hooks: list[Any] = []
        self.step_s: dict[tuple[str, ...], list[float]] = {}  # (model, sampler) -> every observed step time

    async def __aenter__(self) -> EngineHarness:
        from server.engine.engine import Engine
        from server.engine.specs import resolve_models
        from server.metrics import Metrics

        s = self.settings
        models = resolve_models(s.models, s.default_tokenizer, s.default_generator)
        await self.queue.open()
        self.metrics = Metrics()
        self.metrics.step_seconds = _Copied(self.metrics.step_seconds, self.step_s)
        self.engine = Engine(s, models, self.queue, self.metrics)
        await self.engine.start()
        for name, rt in self.engine.runtimes.items():
            self._hook(name, rt.module)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        await self.engine.stop(timeout=5.0)
        await self.queue.release()

    def _hook(self, name: str, module: torch.nn.Module) -> None:
        times, rows = self.forward_s.setdefault(name, []), self.forward_rows.setdefault(name, [])
        started: list[float] = []

        def pre(_m: torch.nn.Module, args: tuple[Any, ...]) -> None:
            started.append(time.perf_counter())

        def post(_m: torch.nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            if started:
                times.append(time.perf_counter() - started.pop())
                rows.append(int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) else 0)

        self._hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def runtime(self, name: str) -> Any:
        return self.engine.runtimes[name]

    # ------------------------------------------------------------------ jobs
    async def _submit_all(self, jobs: list[Job]) -> list[JobResult]:
        return list(await asyncio.gather(*(self.queue.submit(j) for j in jobs)))

    async def tokenize(self, op: str, model: str, batch: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
        """``batch`` (B, ...) submitted as B one-row jobs at once (B concurrent requests); returns the
        seconds until the last result and the outputs."""
        payload = EncodePayload if op == "encode" else DecodePayload
        jobs = [Job(model=model, payload=payload(x[None]), request_id=uuid.uuid4().hex) for x in batch]
        t0 = time.perf_counter()
        results = await self._submit_all(jobs)
        wall = time.perf_counter() - t0
        key = "tokens" if op == "encode" else "images"
        return wall, [r.tensors[key] for r in results]

    async def generate(self, model: str, rows: int, steps: int, *, sampler: str = "sde", cfg_scale: float = 1.75,
                       guidance: tuple[float, float] = (0.0, 0.7), path_type: str = "linear",
                       seed: int = 0) -> GenerateRun:
        """``rows`` one-image jobs (as ``rows`` concurrent ``/v1/generate`` calls), submitted at once."""
        spec = self.engine.models.specs[model]
        kind = f"generate:{model}"
        classes = spec.classes
        jobs = [Job(model=model, request_id=uuid.uuid4().hex, payload=GeneratePayload([SampleRequest(
            class_id=classes[i % len(classes)], seed=seed + i, steps=steps, cfg_scale=cfg_scale,
            guidance_low=guidance[0], guidance_high=guidance[1], sampler=sampler, path_type=path_type)]))
            for i in range(rows)]
        self.queue.reports[kind] = []
        fwd, fwd_rows = self.forward_s[model], self.forward_rows[model]
        n0 = len(fwd)
        timer = self.step_s.setdefault((model, sampler), [])
        k0 = len(timer)
        t0 = time.perf_counter()
        await self._submit_all(jobs)
        wall = time.perf_counter() - t0
        reports = self.queue.reports[kind]
        # report k follows step k (1-based); the gap between reports k and k + 1 is the loop iteration that ran
        # step k + 1. Kept: steps 3 .. S - 1 (step 2 may still see late admissions; step S also decodes)
        periods = [b - a for a, b in zip(reports[:-1], reports[1:], strict=True)][1:-1]
        one_per_step = len(fwd) - n0 == steps  # SDE / Euler: one (guided) forward per step
        kept = fwd[n0:][2:2 + len(periods)] if one_per_step else []
        kept_rows = fwd_rows[n0:][2:2 + len(periods)] if one_per_step else []
        timed = timer[k0:][2:2 + len(periods)]  # step k's time is observed with report k
        return GenerateRun(rows, steps, wall, periods, kept, kept_rows, timed, together=len(reports) == steps)


class _Copied:
    """A labelled histogram whose observations are also appended to ``sink[labels]``."""

    def __init__(self, histogram: Any, sink: dict[tuple[str, ...], list[float]]) -> None:
        self._histogram = histogram
        self._sink = sink

    def labels(self, *labels: str) -> Any:
        child, seen = self._histogram.labels(*labels), self._sink.setdefault(tuple(labels), [])

        class _Child:
            def observe(self, value: float) -> None:
                seen.append(value)
                child.observe(value)

        return _Child()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._histogram, name)
