"""Worker loops: each serves one queue kind on one model, pulling jobs through the :class:`JobQueue`
interface (in-process or Redis alike) and running torch in the device thread.

* :class:`BatchLoop`: encode or decode with dynamic batching (``Batcher``) and per-job failure isolation.
* :class:`GenerateLoop`: step-level batching (``GenerationScheduler``): new jobs join at step boundaries
  (by priority, then deadline), cancelled / expired ones leave (their rows are freed at once), progress is
  reported per step, finished rows are copied to the host once (their state stays on the runtime's device
  while they run), un-normalised (continuous latents; codes pass as they are) and decoded together by the
  tokenizer. SiT / DiT / MAR / MaskGIT / VAR all run this way: a step is a denoising step, a
  MAR or MaskGIT iteration, or a VAR scale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.sampling.base import StepSampler
from server.engine.batching import Batcher, BatchPolicy, row_chunked, run_chunked, run_isolated
from server.engine.runtime import DeviceThread, GeneratorRuntime, Runtime, TokenizerRuntime, to_host
from server.engine.scheduler import GenerationScheduler, StepOutcome
from server.errors import DeadlineExceeded, ModelFailed
from server.metrics import Metrics
from server.queue.base import DecodePayload, EncodePayload, Job, JobQueue, JobResult, Progress, job_kind

log = logging.getLogger("tokserve.worker")


def _model_error(job: Job, err: BaseException) -> ModelFailed:
    log.error("request %s (job %s, %s) failed: %s: %s", job.request_id, job.id, job.kind, type(err).__name__, err,
              exc_info=err)
    return ModelFailed(f"the model failed on this request ({type(err).__name__}: {err})")


async def _drop_dead(queue: JobQueue, jobs: list[Job]) -> list[Job]:
    """Fail expired jobs (504) and forget cancelled ones; return the live ones."""
    now = time.time()
    live = []
    for job in jobs:
        if job.expired(now):
            await queue.fail(job, DeadlineExceeded("deadline passed before the job ran"))
        else:
            live.append(job)
    gone = await queue.cancelled(live) if live else set()
    return [j for j in live if j.id not in gone]


def invariant_rows(policy: BatchPolicy, runtime: Runtime) -> int:
    """Rows per model call for ``runtime``'s batch invariance: none needed when its runners are batch-invariant
    already (ONNX Runtime on the CPU), else the policy's (``TOKSERVE_BATCH_INVARIANT``: one row per call)."""
    return 0 if runtime.batch_invariant else policy.invariant_rows


class BatchLoop:
    """Serves ``encode:<tokenizer>`` or ``decode:<tokenizer>``."""

    def __init__(self, op: str, runtime: TokenizerRuntime, queue: JobQueue, device: DeviceThread,
                 policy: BatchPolicy, metrics: Metrics) -> None:
        if op not in ("encode", "decode"):
            raise ValueError(op)
        self.op = op
        self.model = runtime.spec.name
        self.kind = job_kind(op, self.model)
        self.runtime = runtime
        self.queue = queue
        self.device = device
        self.policy = policy
        self.metrics = metrics
        self._fn = row_chunked(runtime.encode if op == "encode" else runtime.decode,
                               invariant_rows(policy, runtime))
        self._out = "tokens" if op == "encode" else "images"
        self._tokens_per_row = runtime.spec.tokens_per_image

    def _input(self, job: Job) -> torch.Tensor:
        p = job.payload
        if isinstance(p, EncodePayload) and self.op == "encode":
            return p.images
        if isinstance(p, DecodePayload) and self.op == "decode":
            return p.tokens
        raise TypeError(f"{self.kind} got a {type(p).__name__}")

    async def _execute(self, jobs: list[Job]) -> list[torch.Tensor]:
        outs, sizes = await self.device.run(run_chunked, self._fn, [self._input(j) for j in jobs],
                                            self.policy.max_rows)
        for n in sizes:
            self.metrics.batch_size.labels(self.op, self.model).observe(n)
        return outs

    async def run(self, stop: asyncio.Event) -> None:
        batcher = Batcher(lambda n, t: self.queue.take(self.kind, n, t), self.policy)
        while not stop.is_set() or batcher.carried:
            self.metrics.beat(self.kind)
            jobs = await _drop_dead(self.queue, await batcher.next_batch())
            if jobs:
                await self._serve(jobs)

    async def _serve(self, jobs: list[Job]) -> None:
        t0 = time.time()
        results = await run_isolated(jobs, self._execute)
        t1 = time.time()
        for job, out in results:
            if isinstance(out, BaseException):
                await self.queue.fail(job, _model_error(job, out))
                continue
            queue_s = max(0.0, (job.taken_at or t0) - job.submitted_at)
            await self.queue.complete(job, JobResult({self._out: out}, queue_ms=1e3 * queue_s,
                                                     compute_ms=1e3 * (t1 - t0)))
            m = self.metrics
            m.queue_seconds.labels(self.op, self.model).observe(queue_s)
            m.compute_seconds.labels(self.op, self.model).observe(t1 - t0)
            m.images.labels(self.op, self.model).inc(job.rows)
            m.tokens.labels(self.op, self.model).inc(job.rows * self._tokens_per_row)


@dataclass
class _Decoded:
    finished: list[tuple[Job, torch.Tensor, torch.Tensor, float]]  # job, images, tokens, started_at
    failed: list[tuple[Job, BaseException]]
    outcome: StepOutcome


class GenerateLoop:
    """Serves ``generate:<generator>``: one running batch per sampler, stepped round-robin."""

    def __init__(self, runtime: GeneratorRuntime, tokenizer: TokenizerRuntime, queue: JobQueue,
                 device: DeviceThread, policy: BatchPolicy, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.model = runtime.spec.name
        self.kind = job_kind("generate", self.model)
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.queue = queue
        self.device = device
        self.policy = policy
        self.metrics = metrics
        self._samplers: dict[str, StepSampler] = {}
        model = runtime.sampler_model
        if runtime.denoiser:  # SiT / DiT: model_fn(x, t, y), all (N, ...); MAR / MaskGIT / VAR are not covered
            model = row_chunked(model, invariant_rows(policy, runtime))
        self._tokenizer_decode = row_chunked(tokenizer.decode, invariant_rows(policy, tokenizer))
        self.scheduler = GenerationScheduler(self._sampler, model, runtime.spec.token_shape,
                                             policy.max_rows, clock=clock)

    def _sampler(self, name: str) -> StepSampler:
        if name not in self._samplers:
            self._samplers[name] = self.runtime.make_sampler(name, self.tokenizer)
        return self._samplers[name]

    async def run(self, stop: asyncio.Event) -> None:
        s = self.scheduler
        while not stop.is_set() or len(s):
            self.metrics.beat(self.kind)
            if s.free_rows > 0 and not stop.is_set():
                timeout = 0.0 if len(s) else self.policy.idle_timeout_s
                for job in await _drop_dead(self.queue, await self.queue.take(self.kind, s.free_rows, timeout)):
                    try:
                        await self.device.run(s.admit, job)
                    except Exception as e:
                        await self.queue.fail(job, _model_error(job, e))
            if not len(s):
                continue
            await self._drop_gone()
            if not len(s):
                continue
            result: _Decoded = await self.device.run(self._step_and_decode)
            await self._report(result)

    async def _drop_gone(self) -> None:
        s = self.scheduler
        jobs = s.jobs
        live = await _drop_dead(self.queue, jobs)
        live_ids = {j.id for j in live}
        dropped = s.drop(j.id for j in jobs if j.id not in live_ids)
        if dropped:  # their rows are free from the next step
            self.metrics.rows_cancelled.labels(self.model).inc(sum(j.rows for j in dropped))
            self.metrics.generation_rows.labels(self.model).set(s.running_rows)
            self.metrics.generation_waiting.labels(self.model).set(s.waiting_rows)

    def _decode(self, latents: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tokens = [self.tokenizer.denormalize(x) for x in latents]
        images, _ = run_chunked(self._tokenizer_decode, tokens, self.policy.max_rows)
        return list(zip(images, tokens, strict=True))

    def _step_and_decode(self) -> _Decoded:
        """In the device thread: one step of every running batch, then decode what finished (batched)."""
        outcome = self.scheduler.step()
        failed = list(outcome.failed)
        finished = []
        if outcome.finished:
            # the rows lived on the runtime's device; this is their one copy back, all finished jobs together
            host = to_host([lat for _, lat, _ in outcome.finished])
            jobs = [(j, lat, t) for (j, _, t), lat in zip(outcome.finished, host, strict=True)]
            try:
                pairs = self._decode([lat for _, lat, _ in jobs])
                finished = [(j, img, tok, t) for (j, _, t), (img, tok) in zip(jobs, pairs, strict=True)]
            except Exception:
                for job, lat, started in jobs:  # isolate the failing job
                    try:
                        (img, tok), = self._decode([lat])
                        finished.append((job, img, tok, started))
                    except Exception as e:
                        failed.append((job, e))
        return _Decoded(finished, failed, outcome)

    async def _report(self, r: _Decoded) -> None:
        m = self.metrics
        s = self.scheduler
        for t in r.outcome.timings:
            m.step_seconds.labels(self.model, t.sampler).observe(t.seconds)
            m.batch_size.labels("generate", self.model).observe(t.rows)
        m.generation_rows.labels(self.model).set(s.running_rows)
        m.generation_waiting.labels(self.model).set(s.waiting_rows)
        if r.outcome.progress:
            await self.queue.progress([Progress(job, done, total) for job, done, total in r.outcome.progress])
        for job, err in r.failed:
            await self.queue.fail(job, _model_error(job, err))
        now = time.time()
        for job, images, tokens, started in r.finished:
            tensors = {"images": images}
            if job.payload.return_latents:  # type: ignore[union-attr]
                tensors["latents"] = tokens
            queue_s = max(0.0, started - job.submitted_at)
            await self.queue.complete(job, JobResult(tensors, queue_ms=1e3 * queue_s,
                                                     compute_ms=1e3 * (now - started)))
            m.queue_seconds.labels("generate", self.model).observe(queue_s)
            m.compute_seconds.labels("generate", self.model).observe(now - started)
            m.images.labels("generate", self.model).inc(job.rows)
            m.tokens.labels("generate", self.model).inc(job.rows * self.runtime.spec.tokens_per_image)
