"""The worker engine: loads the models on its device, warms them up, and runs one loop per (op, model)
against a :class:`JobQueue`. Embedded in the API process (in-process queue) or alone (``server.worker``)."""

from __future__ import annotations

import asyncio
import logging

import torch

from models.layers.attention import set_attention_mode
from models.sampling.base import SampleRequest
from server.engine.batching import BatchPolicy
from server.engine.loops import BatchLoop, GenerateLoop
from server.engine.runtime import (
    DeviceThread,
    GeneratorRuntime,
    Runtime,
    TokenizerRuntime,
    build_runtimes,
)
from server.engine.specs import ModelSet
from server.metrics import Metrics
from server.queue.base import JobQueue
from server.settings import Settings

log = logging.getLogger("tokserve.engine")


class Engine:
    def __init__(self, settings: Settings, models: ModelSet, queue: JobQueue, metrics: Metrics) -> None:
        self.settings = settings
        self.models = models
        self.queue = queue
        self.metrics = metrics
        self.device = DeviceThread()
        self.runtimes: dict[str, Runtime] = {}
        self.loops: list[BatchLoop | GenerateLoop] = []
        self.ready = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Load, warm up, start the loops; ``ready`` is True afterwards."""
        s = self.settings
        if s.torch_threads:
            await self.device.run(torch.set_num_threads, s.torch_threads)
        set_attention_mode(s.attention)  # process-wide: every model's attention form (TOKSERVE_ATTENTION)
        self.runtimes = await self.device.run(build_runtimes, list(self.models.specs.values()), s)
        if s.warmup:
            await self.device.run(self._warmup)
        invariant = s.batch_invariant
        policy = BatchPolicy(max_rows=s.max_batch_size, max_wait_s=s.max_wait_ms / 1000.0,
                             invariant_rows=1 if invariant else 0)
        log.info("attention %s; batch-invariant model calls %s", s.attention, "on" if invariant else "off")
        for rt in self.runtimes.values():
            if isinstance(rt, TokenizerRuntime):
                self.loops += [BatchLoop(op, rt, self.queue, self.device, policy, self.metrics)
                               for op in ("encode", "decode")]
            elif isinstance(rt, GeneratorRuntime):
                tok = self.runtimes[rt.spec.tokenizer or ""]
                assert isinstance(tok, TokenizerRuntime)
                self.loops.append(GenerateLoop(rt, tok, self.queue, self.device, policy, self.metrics))
        self._tasks = [asyncio.create_task(self._supervise(loop), name=f"tokserve:{loop.kind}")
                       for loop in self.loops]
        self.ready = True
        self.metrics.ready.set(1)
        log.info("engine ready: %s", ", ".join(loop.kind for loop in self.loops))

    def _warmup(self) -> None:
        """Every runner's warm-up (compilation, CUDA graph capture), then one call of every model (first-call
        allocations, lazy inits) before reporting ready."""
        for rt in self.runtimes.values():
            rt.warmup()
        for rt in self.runtimes.values():
            spec = rt.spec
            if isinstance(rt, TokenizerRuntime):
                s = spec.image_size
                rt.decode(rt.encode(torch.zeros(1, 3, s, s)))
            elif isinstance(rt, GeneratorRuntime):
                tok = self.runtimes[spec.tokenizer or ""]
                assert isinstance(tok, TokenizerRuntime)
                name = spec.defaults["sampler"]
                sampler = rt.make_sampler(name, tok)
                steps = rt.family.warmup_steps(int(spec.defaults["steps"]))
                req = SampleRequest(class_id=spec.classes[0], seed=0, steps=steps, cfg_scale=2.0, sampler=name,
                                    path_type=spec.defaults["path_type"])
                rows = [sampler.init_row(req, spec.token_shape)]
                sampler.step(rt.sampler_model, rows)

    async def _supervise(self, loop: BatchLoop | GenerateLoop) -> None:
        """Run a loop; a bug that escapes it is logged, its jobs fail, and the loop restarts."""
        while True:
            try:
                await loop.run(self._stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker loop %s crashed; restarting", loop.kind)
                if isinstance(loop, GenerateLoop):
                    for job in loop.scheduler.drop([j.id for j in loop.scheduler.jobs]):
                        await self.queue.fail(job, RuntimeError("the worker loop crashed"))
                await asyncio.sleep(0.1)

    async def stop(self, timeout: float) -> None:
        """Stop the loops: each finishes what it holds for up to ``timeout`` seconds, then is cancelled and
        its unfinished generation jobs are handed back. A model call already running in the device thread
        finishes there (it cannot be interrupted); nothing waits for it here."""
        self._stop.set()
        if self._tasks:
            pending = set(self._tasks)
            if timeout > 0:
                _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=0.5)
            for loop in self.loops:
                if isinstance(loop, GenerateLoop):
                    for job in loop.scheduler.drop([j.id for j in loop.scheduler.jobs]):
                        await self.queue.hand_back(job)
        self.ready = False
        self.metrics.ready.set(0)
        self.device.shutdown(wait=False)
