"""Step-level batching of rows (denoising steps, MAR / MaskGIT iterations, VAR scales) for one generator: pure Python + torch, no queue, no asyncio.

Each admitted job contributes one :class:`Row` per image (own seed, class, guidance scale and interval, step
count). Rows wait until there is room (``max_rows`` running), then join the running batch of their sampler at
the next step boundary (the highest ``priority`` first, then the earliest deadline, then in admission order);
:meth:`GenerationScheduler.step` advances every running batch by one step of each row's own schedule and
reports each job's progress; a job is finished when all its rows are, and its normalised latents (B, L, C) are
returned. A model failure is isolated: the failed group is re-run job by job and only the failing jobs end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from models.sampling.base import ModelFn, Row, StepSampler, StepStats
from server.queue.base import GeneratePayload, Job


@dataclass
class _Entry:
    job: Job
    sampler: str
    rows: list[Row]
    joined: int = 0  # rows[:joined] have entered the running batch
    started_at: float | None = None  # when its first row joined
    reported: int = 0  # the step last reported in StepOutcome.progress


@dataclass
class StepTiming:
    sampler: str
    rows: int
    seconds: float
    stats: StepStats


@dataclass
class StepOutcome:
    """What one :meth:`GenerationScheduler.step` produced."""

    finished: list[tuple[Job, torch.Tensor, float]] = field(default_factory=list)  # job, (B, L, C), started
    failed: list[tuple[Job, BaseException]] = field(default_factory=list)
    timings: list[StepTiming] = field(default_factory=list)
    progress: list[tuple[Job, int, int]] = field(default_factory=list)  # job, steps done (slowest row), total


_Saved = tuple[torch.Tensor | list[torch.Tensor], list[tuple[int, dict, torch.Tensor]]]


def _snapshot(rows: list[Row]) -> _Saved:
    """What :func:`_restore` needs: a copy of every row's ``x`` (MAR and VAR write into it), its step, a shallow
    copy of its state dict (samplers replace its values rather than mutate them) and its RNG state. The ``x``
    of rows alike (shape, dtype, device: the usual case) are copied in one stack, not one clone per row: taken
    before every step, per-row clones were most of the scheduler's own time (about 5 ms a step at 256 rows)."""
    xs = [r.x for r in rows]
    first = xs[0]
    alike = all(x.shape == first.shape and x.dtype == first.dtype and x.device == first.device for x in xs)
    copy: torch.Tensor | list[torch.Tensor] = torch.stack(xs) if alike else [x.clone() for x in xs]
    return copy, [(r.step, dict(r.state), r.generator.get_state()) for r in rows]


def _restore(rows: list[Row], saved: _Saved) -> None:
    """Put rows back as they were before a failed step."""
    copy, rest = saved
    for i, (r, (step, state, rng)) in enumerate(zip(rows, rest, strict=True)):
        r.x, r.step, r.state = copy[i], step, state
        r.generator.set_state(rng)


class GenerationScheduler:
    """``samplers(name)`` returns the StepSampler of a sampler name; ``model_fn`` is what the samplers call
    (the generator's forward for SiT / DiT, the module for MAR / MaskGIT / VAR); ``shape`` is a row's shape."""

    def __init__(self, samplers: Callable[[str], StepSampler], model_fn: ModelFn, shape: tuple[int, int],
                 max_rows: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self._samplers = samplers
        self.model_fn = model_fn
        self.shape = shape
        self.max_rows = max_rows
        self._clock = clock
        self._entries: dict[str, _Entry] = {}  # job id -> entry, in admission order

    # ------------------------------------------------------------------ state
    @property
    def running_rows(self) -> int:
        return sum(e.joined - sum(1 for r in e.rows[:e.joined] if r.done) for e in self._entries.values())

    @property
    def waiting_rows(self) -> int:
        return sum(len(e.rows) - e.joined for e in self._entries.values())

    @property
    def free_rows(self) -> int:
        """Room for new rows, counting the waiting ones (a worker takes jobs only while this is > 0)."""
        return self.max_rows - self.running_rows - self.waiting_rows

    @property
    def jobs(self) -> list[Job]:
        return [e.job for e in self._entries.values()]

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ admission
    def admit(self, job: Job) -> None:
        """Create the job's rows (noise from each row's own generator); they join at the next step."""
        payload = job.payload
        if not isinstance(payload, GeneratePayload) or not payload.requests:
            raise ValueError("a generation job needs a GeneratePayload with at least one request")
        names = {r.sampler for r in payload.requests}
        if len(names) != 1:
            raise ValueError(f"one sampler per job, got {sorted(names)}")
        name = names.pop()
        sampler = self._samplers(name)
        rows = [sampler.init_row(r, self.shape) for r in payload.requests]
        self._entries[job.id] = _Entry(job=job, sampler=name, rows=rows)

    def drop(self, job_ids: Iterable[str]) -> list[Job]:
        """Remove jobs (cancelled, deadline passed): their rows leave at once. Returns the removed jobs."""
        return [self._entries.pop(i).job for i in list(job_ids) if i in self._entries]

    # ------------------------------------------------------------------ stepping
    def _join_order(self) -> list[_Entry]:
        """Waiting rows join by priority (highest first), then deadline (earliest first), then admission."""
        inf = float("inf")
        return sorted(self._entries.values(),
                      key=lambda e: (-e.job.priority, inf if e.job.deadline is None else e.job.deadline))

    def _join(self) -> None:
        room = self.max_rows - self.running_rows
        now = self._clock()
        for e in self._join_order():
            if room <= 0:
                break
            n = min(room, len(e.rows) - e.joined)
            if n > 0:
                if e.started_at is None:
                    e.started_at = now
                e.joined += n
                room -= n

    def step(self) -> StepOutcome:
        """Join waiting rows, advance each sampler's running rows by one step, collect finished jobs."""
        self._join()
        out = StepOutcome()
        groups: dict[str, list[_Entry]] = {}
        for e in self._entries.values():
            if any(not r.done for r in e.rows[:e.joined]):
                groups.setdefault(e.sampler, []).append(e)
        for name, entries in groups.items():
            sampler = self._samplers(name)
            rows = [r for e in entries for r in e.rows[:e.joined] if not r.done]
            saved = _snapshot(rows)  # a failed step may have drawn noise: restore before the isolated retry
            t0 = self._clock()
            try:
                stats = sampler.step(self.model_fn, rows)
            except Exception:
                _restore(rows, saved)
                stats = self._step_isolated(sampler, entries, out)
            out.timings.append(StepTiming(name, len(rows), self._clock() - t0, stats))
            for e in entries:
                if e.job.id in self._entries:
                    done = min(r.step for r in e.rows)
                    if done > e.reported:
                        e.reported = done
                        out.progress.append((e.job, done, max(r.total for r in e.rows)))
        for e in list(self._entries.values()):
            if e.joined == len(e.rows) and all(r.done for r in e.rows):
                del self._entries[e.job.id]
                sampler = self._samplers(e.sampler)
                latents = torch.stack([sampler.result(r) for r in e.rows])
                out.finished.append((e.job, latents, e.started_at or self._clock()))
        return out

    def _step_isolated(self, sampler: StepSampler, entries: list[_Entry], out: StepOutcome) -> StepStats:
        total = StepStats()
        for e in entries:
            rows = [r for r in e.rows[:e.joined] if not r.done]
            try:
                s = sampler.step(self.model_fn, rows)
            except Exception as err:
                del self._entries[e.job.id]
                out.failed.append((e.job, err))
                continue
            total.rows += s.rows
            total.model_rows += s.model_rows
            total.uncond_rows += s.uncond_rows
            total.forwards += s.forwards
        return total
