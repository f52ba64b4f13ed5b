"""The Redis Streams queue backend (``REDIS_URL``): API processes and workers on any number of machines.

API side: a job is a hash (its state) plus an entry in the stream of its kind and priority band; the caller
blocks on the job's event stream (XREAD) until a terminal event, then reads the result key. Worker side: a
consumer group per stream; one XREADGROUP takes many jobs (a batch); a result is written once (Lua, see
``redis_scripts``), then acknowledged. Recovery: a live worker keeps resetting the idle time of what it holds;
jobs idle past ``redis_reclaim_s`` (their worker died) are taken over with XAUTOCLAIM; deliveries are
counted and a job that failed ``redis_max_deliveries`` of them goes to the dead-letter stream with its error.
Outages: API calls fail fast with 503 (short connect timeout, a short circuit-breaker), waiting callers and
workers retry until Redis is back. Durability of accepted jobs across a Redis restart needs AOF
(``appendonly yes``); without it a restart loses them (callers then get 503, never a hang).

Key layout and scripts: :mod:`server.queue.redis_scripts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.errors import (
    BackendUnavailable,
    DeadlineExceeded,
    InternalError,
    InvalidValue,
    ModelFailed,
    NotReady,
    QueueFull,
    ShuttingDown,
    TokservError,
    from_wire,
    to_wire,
)
from server.queue import redis_scripts as lua
from server.queue.base import TERMINAL, Job, JobEvent, JobInfo, JobQueue, JobResult, LocalIdleMixin, Progress
from server.queue.redis_scripts import GROUP, Keys, band_of
from server.queue.wire import job_from_bytes, job_to_bytes, result_from_bytes, result_to_bytes

if TYPE_CHECKING:
    from server.settings import Settings

log = logging.getLogger("tokserve.redis")
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
EVENTS_MAXLEN = 5000
DEAD_MAXLEN = 10_000
_STREAM_ID = re.compile(rb"^[0-9]{1,20}-[0-9]{1,20}$")
T = TypeVar("T")


@dataclass(frozen=True)
class RedisOptions:
    url: str
    prefix: str = "tokserve"
    capacity: int = 256
    retry_after_s: float = 1.0
    job_ttl_s: float = 3600.0
    idempotency_ttl_s: float = 600.0
    reclaim_s: float = 30.0
    max_deliveries: int = 3
    stream_maxlen: int = 100_000
    connect_timeout_s: float = 0.5
    timeout_s: float = 2.0
    heartbeat_s: float = 2.0
    worker_id: str | None = None
    block_s: float = 5.0  # longest single blocking read
    breaker_s: float = 0.5  # after a failed call, API calls answer 503 without trying for this long

    @classmethod
    def from_settings(cls, s: Settings) -> RedisOptions:
        assert s.redis_url
        return cls(url=s.redis_url, prefix=s.redis_prefix, capacity=s.queue_capacity,
                   retry_after_s=s.retry_after_s, job_ttl_s=s.job_ttl_s, idempotency_ttl_s=s.idempotency_ttl_s, reclaim_s=s.redis_reclaim_s,
                   max_deliveries=s.redis_max_deliveries, stream_maxlen=s.redis_stream_maxlen,
                   connect_timeout_s=s.redis_connect_timeout_s, timeout_s=s.redis_timeout_s,
                   heartbeat_s=s.worker_heartbeat_s, worker_id=s.worker_id)


@dataclass
class _Delivery:
    """A stream entry handed to this consumer: ``deliveries`` counts this one (tries before + times read)."""

    stream: str
    entry: str
    job_id: str
    raw: bytes
    tries: int
    deliveries: int


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _event_json(job_id: str, status: str, **data: Any) -> str:
    return json.dumps({"job": job_id, "status": status, "time": time.time(), **data}, separators=(",", ":"))


class RedisQueue(LocalIdleMixin, JobQueue):  # drain: this process's waiting callers; jobs stay in Redis
    """One client per process. ``kinds``: what the API process serves (its /readyz needs a live worker for
    each); a worker process passes none and calls :meth:`announce` once its models are ready."""

    def __init__(self, opts: RedisOptions, kinds: Sequence[str] = ()) -> None:
        self.opts = opts
        self.keys = Keys(opts.prefix)
        self.kinds_required = list(kinds)
        self.worker_id = opts.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        common: dict[str, Any] = {"socket_connect_timeout": opts.connect_timeout_s,
                                  "retry": Retry(NoBackoff(), 1), "decode_responses": False}
        # Commands get a short timeout; blocking reads (XREAD / XREADGROUP BLOCK) a longer one than their block
        # time: redis-py's default 5 s socket timeout would cut a blocking read short.
        self._r = Redis.from_url(opts.url, socket_timeout=opts.timeout_s, **common)
        self._rb = Redis.from_url(opts.url, socket_timeout=opts.block_s + opts.timeout_s + 1.0, **common)
        self._claim = self._r.register_script(lua.CLAIM)
        self._finish_script = self._r.register_script(lua.FINISH)
        self._requeue = self._r.register_script(lua.REQUEUE)
        self._cancel = self._r.register_script(lua.CANCEL)
        self._progress = self._r.register_script(lua.PROGRESS)
        self._touch = self._r.register_script(lua.TOUCH)
        self._submit = self._r.register_script(lua.SUBMIT)
        self._held: dict[str, _Delivery] = {}  # job id -> delivery this worker holds
        self._lost: set[str] = set()  # held jobs another worker reclaimed (we were presumed dead)
        self._groups: set[str] = set()  # streams whose consumer group exists (as far as we know)
        self._kinds: set[str] = set(kinds)
        self._depths: dict[str, int] = {}
        self._next_reclaim: dict[str, float] = {}
        self._announced: tuple[list[str], dict[str, Any]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._down_until = 0.0
        self._outage_logged = 0.0
        self._closed = False
        self._released = False
        self._released_event = asyncio.Event()
        self._waiters = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.duplicates = 0  # results of jobs that had already ended (a reclaimed job ran twice)

    # ================================================================== lifecycle
    async def open(self) -> None:
        self._spawn(self._maintain())

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def release(self) -> None:
        """Withdraw this worker's announcement, hand back every job it still holds, disconnect."""
        announced, self._announced = self._announced, None
        self._released = True
        self._released_event.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if announced is not None:
            with contextlib.suppress(*UNREACHABLE):
                await self._r.delete(self.keys.worker(self.worker_id))
                await self._r.srem(self.keys.workers, self.worker_id)
        for job_id in list(self._held):
            d = self._held[job_id]
            if job_id in self._lost:  # another worker reclaimed it: theirs
                continue
            with contextlib.suppress(*UNREACHABLE):
                await self._requeue_delivery(d, d.tries, None, "handed back by a stopping worker")
        for client in (self._r, self._rb):
            with contextlib.suppress(Exception):
                await client.aclose()

    # ================================================================== failures
    def _check_open(self) -> None:
        if self._closed:
            raise ShuttingDown("the server is shutting down", retry_after=self.opts.retry_after_s)

    @contextlib.contextmanager
    def _api(self) -> Iterator[None]:
        """Around API-side calls: answer 503 at once while Redis is known down, and when a call fails."""
        if time.monotonic() < self._down_until:
            raise BackendUnavailable("the queue backend (Redis) is unreachable; retry shortly",
                                     retry_after=self.opts.retry_after_s)
        try:
            yield
        except UNREACHABLE as e:
            self._down_until = time.monotonic() + self.opts.breaker_s
            self._log_outage(e)
            raise BackendUnavailable(f"the queue backend (Redis) is unreachable ({type(e).__name__}); retry "
                                     "shortly", retry_after=self.opts.retry_after_s) from None

    def _log_outage(self, e: BaseException) -> None:
        now = time.monotonic()
        if now - self._outage_logged > 10.0:
            self._outage_logged = now
            log.warning("Redis unreachable (%s: %s); retrying", type(e).__name__, e)

    async def _until_done(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` until Redis answers (a worker's result must not be lost to an outage)."""
        delay = 0.05
        while True:
            try:
                return await fn()
            except UNREACHABLE as e:
                self._log_outage(e)
                log.debug("%s: Redis unreachable, retrying in %.2f s", what, delay)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    # ================================================================== API side
    async def submit(self, job: Job) -> JobResult:
        job_id, new = await self._accept(job)
        self._waiters += 1
        self._idle.clear()
        try:
            return await self._wait_unless_released(job_id, job.deadline)
        except (DeadlineExceeded, asyncio.CancelledError):
            if new and not self._released:  # the caller gave up: workers drop the job (in the background)
                self._spawn(self._quietly(self._cancel_job(job_id, "abandoned by its caller")))
            raise
        finally:
            self._waiters -= 1
            if not self._waiters:
                self._idle.set()

    async def _wait_unless_released(self, job_id: str, deadline: float | None) -> JobResult:
        """:meth:`_wait`, cut short by :meth:`release` (the API process stops after its grace): the caller
        gets 503 + Retry-After; the job stays queued for the workers (a retry with the same
        Idempotency-Key attaches to it)."""
        waiting = asyncio.ensure_future(self._wait(job_id, deadline))
        released = asyncio.ensure_future(self._released_event.wait())
        try:
            await asyncio.wait({waiting, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            released.cancel()
            if not waiting.done():
                waiting.cancel()
        if waiting.done() and not waiting.cancelled():
            return waiting.result()
        raise ShuttingDown("the server stopped before the result was ready; the job stays queued",
                           retry_after=self.opts.retry_after_s)

    async def enqueue(self, job: Job) -> str:
        job.tracked = True
        job_id, _ = await self._accept(job)
        return job_id

    async def _accept(self, job: Job) -> tuple[str, bool]:
        """Add ``job`` (or find the job its idempotency key names): (job id, whether it is new)."""
        self._check_open()
        self._kinds.add(job.kind)
        with self._api():
            if job.idempotency_key is not None:  # a repeat attaches to the first job, even when full
                existing = await self._existing(job)
                if existing is not None:
                    return existing, False
            await self._check_capacity(job.kind)
            if job.expired():
                raise DeadlineExceeded("the deadline passed before the request was queued")
            existing = await self._add(job)
            if existing is not None:
                return existing, False
        return job.id, True

    async def _check_capacity(self, kind: str) -> None:
        waiting = (await self._waiting([kind])).get(kind, 0)
        if waiting >= self.opts.capacity:
            raise QueueFull(f"queue {kind!r} is full ({self.opts.capacity} waiting); retry later",
                            retry_after=self.opts.retry_after_s)

    async def _waiting(self, kinds: Sequence[str]) -> dict[str, int]:
        """Jobs not yet delivered to any worker, per kind (the consumer group's lag; XLEN before a group)."""
        pipe = self._r.pipeline(transaction=False)
        streams = [(k, s) for k in kinds for s in self.keys.streams(k)]
        for _, s in streams:
            pipe.xinfo_groups(s)
            pipe.xlen(s)
        replies = await pipe.execute(raise_on_error=False)
        out: dict[str, int] = {k: 0 for k in kinds}
        for i, (kind, _) in enumerate(streams):
            groups, length = replies[2 * i], replies[2 * i + 1]
            if isinstance(length, BaseException):
                if isinstance(length, UNREACHABLE):
                    raise length
                continue
            lag = None
            if not isinstance(groups, BaseException):
                for g in groups:
                    if _s(g.get("name")) == GROUP:
                        lag = g.get("lag")
                        if lag is None:
                            lag = length  # unknown after deletions: an upper bound
            out[kind] += int(length if lag is None else lag)
        return out

    async def _existing(self, job: Job) -> str | None:
        """The id of the live job ``job``'s idempotency key names (422 if its request differs), or None."""
        current = await self._r.get(self.keys.idem(job.idempotency_key))
        return None if current is None else await self._attach(job, current)

    async def _attach(self, job: Job, current: bytes) -> str | None:
        other_id, _, other_fp = _s(current).partition(" ")
        if other_fp != (job.fingerprint or ""):
            raise InvalidValue("Idempotency-Key was already used with a different request")
        return other_id if await self._r.exists(self.keys.job(other_id)) else None

    async def _add(self, job: Job) -> str | None:
        """Add the job and claim its idempotency key in one script; if the key names another live job,
        that job's id (nothing added). A key whose job is gone (expired, lost) is taken over."""
        now = time.time()
        ttl = _ms(max(0.0, (job.deadline or now + 86400.0) - now) + self.opts.job_ttl_s)
        key_ttl = _ms(max(0.0, (job.deadline or now) - now) + self.opts.idempotency_ttl_s)
        state = {"id": job.id, "op": job.op, "model": job.model, "kind": job.kind, "status": "queued",
                 "request_id": job.request_id, "priority": job.priority, "submitted_at": job.submitted_at,
                 "deadline": "" if job.deadline is None else job.deadline, "tracked": int(job.tracked),
                 "meta": json.dumps(job.meta), "deliveries": 0, "idem_key": job.idempotency_key or ""}
        value = f"{job.id} {job.fingerprint or ''}" if job.idempotency_key is not None else ""
        fields = [x for kv in state.items() for x in kv]
        replace = b""
        for _ in range(5):
            answer = await self._submit(
                keys=[self.keys.idem(job.idempotency_key), self.keys.job(job.id), self.keys.events(job.id),
                      self.keys.stream(job.kind, band_of(job.priority))],
                args=[value, key_ttl, replace, ttl, int(job.tracked),
                      _event_json(job.id, "queued", priority=job.priority), EVENTS_MAXLEN, job_to_bytes(job),
                      job.id, self.opts.stream_maxlen, *fields])
            if answer == b"ok":
                return None
            other = await self._attach(job, answer)
            if other is not None:
                return other
            replace = answer  # its job is gone: take the key over if it still names that job
        raise InternalError("could not claim the Idempotency-Key (contention); retry")

    async def _wait(self, job_id: str, deadline: float | None) -> JobResult:
        """Block on the job's event stream until it ends; ride out Redis outages until the deadline."""
        ev, last = self.keys.events(job_id), b"0-0"
        check_at, healthy = 0.0, True
        while True:
            left = self.opts.block_s if deadline is None else deadline - time.time()
            if left <= 0:
                raise DeadlineExceeded("deadline passed before the result was ready")
            try:
                if not healthy or time.monotonic() >= check_at:
                    if not await self._r.exists(self.keys.job(job_id)):
                        raise BackendUnavailable("the job was lost (Redis restarted without its data); retry",
                                                 retry_after=self.opts.retry_after_s)
                    check_at, healthy = time.monotonic() + 5.0, True
                reply = await self._rb.xread({ev: last}, count=100, block=_ms(min(left, self.opts.block_s)))
            except UNREACHABLE as e:
                self._log_outage(e)
                healthy = False
                await asyncio.sleep(min(0.2, max(0.0, left)))
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    kind = _s(fields.get(b"type", b""))
                    if kind in TERMINAL:
                        return await self._outcome(job_id, kind, fields, deadline)

    async def _outcome(self, job_id: str, kind: str, fields: dict[bytes, bytes],
                       deadline: float | None) -> JobResult:
        if kind == "completed":
            left = None if deadline is None else max(1.0, deadline - time.time())
            try:
                raw = await asyncio.wait_for(
                    self._until_done("result", lambda: self._r.get(self.keys.result(job_id))), left)
            except TimeoutError:
                raise BackendUnavailable("the result could not be read (Redis unreachable); retry",
                                         retry_after=self.opts.retry_after_s) from None
            if raw is None:
                raise InternalError("the job's result expired before it was read")
            return result_from_bytes(raw)
        if kind == "cancelled":
            raise DeadlineExceeded("the job was cancelled")
        data = json.loads(fields.get(b"data", b"{}"))
        raise from_wire(data.get("error") or {})

    async def _cancel_job(self, job_id: str, why: str) -> str | None:
        job = self.keys.job(job_id)
        idem_key = await self._r.hget(job, "idem_key")
        status = await self._cancel(
            keys=[job, self.keys.events(job_id), self.keys.idem(_s(idem_key) if idem_key else None)],
            args=[time.time(), _ms(self.opts.job_ttl_s), EVENTS_MAXLEN,
                  _event_json(job_id, "cancelled", reason=why), job_id])
        return None if not status else _s(status)

    @staticmethod
    async def _quietly(coro: Awaitable[Any]) -> None:
        with contextlib.suppress(Exception):
            await coro

    # ================================================================== jobs API
    async def info(self, job_id: str) -> JobInfo | None:
        with self._api():
            h = await self._r.hgetall(self.keys.job(job_id))
            if not h or h.get(b"tracked") != b"1":
                return None
            result = None
            if h.get(b"status") == b"completed":
                raw = await self._r.get(self.keys.result(job_id))
                result = None if raw is None else result_from_bytes(raw)
        return _info(h, result)

    def valid_event_id(self, event_id: str) -> bool:
        """A stream entry id ``<ms>-<seq>``, both parts within Redis's unsigned 64 bits."""
        m = _STREAM_ID.fullmatch(event_id.encode("utf-8", "replace"))
        return m is not None and all(int(part) < 2**64 for part in event_id.split("-"))

    async def events(self, job_id: str, after: str | None, timeout: float) -> list[JobEvent] | None:
        start = after.encode() if after and self.valid_event_id(after) else b"0-0"
        with self._api():
            tracked, status = await self._r.hmget(self.keys.job(job_id), ["tracked", "status"])
            if tracked != b"1":
                return None
            ended = status is not None and _s(status) in TERMINAL
            block = None if ended or timeout <= 0 else _ms(min(timeout, self.opts.block_s))
            reply = await self._rb.xread({self.keys.events(job_id): start}, count=1000, block=block)
        out = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                data = json.loads(fields.get(b"data", b"{}"))
                out.append(JobEvent(_s(entry_id), _s(fields.get(b"type", b"")), data))
        return out

    async def cancel(self, job_id: str) -> JobInfo | None:
        with self._api():
            h = await self._r.hmget(self.keys.job(job_id), ["tracked"])
            if h[0] != b"1":
                return None
            await self._cancel_job(job_id, "cancelled through the jobs API")
        return await self.info(job_id)

    # ================================================================== worker side
    async def take(self, kind: str, max_n: int, timeout: float | None) -> list[Job]:
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        self._kinds.add(kind)
        while True:
            try:
                got = await self._deliveries(kind, max_n, end)
                jobs = await self._admit(got)
            except UNREACHABLE as e:
                self._log_outage(e)
                self._groups.difference_update(self.keys.streams(kind))
                # Every worker's deliveries look idle after an outage: give their owners time to refresh them
                # before reclaiming anything (only a worker that is really gone loses its jobs).
                self._next_reclaim[kind] = time.monotonic() + self.opts.reclaim_s
                left = 0.5 if end is None else end - time.monotonic()
                await asyncio.sleep(max(0.0, min(0.5, left)))
                jobs = []
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                self._groups.difference_update(self.keys.streams(kind))  # Redis lost its data: recreate
                jobs = []
            if jobs:
                return jobs
            if end is not None and time.monotonic() >= end:
                return []

    async def _deliveries(self, kind: str, max_n: int, end: float | None) -> list[_Delivery]:
        await self._ensure_groups(kind)
        got: list[_Delivery] = []
        now = time.monotonic()
        if now >= self._next_reclaim.get(kind, 0.0):
            self._next_reclaim[kind] = now + max(0.2, self.opts.reclaim_s / 4)
            got += await self._reclaim(kind, max_n)
        if len(got) < max_n:
            got += await self._read(kind, max_n - len(got))
        if not got:
            left = self.opts.block_s if end is None else end - time.monotonic()
            if left >= 0.001:
                streams = self.keys.streams(kind)
                # One entry per band at most, so a blocking read overshoots max_n by at most two.
                reply = await self._rb.xreadgroup(GROUP, self.worker_id, dict.fromkeys(streams, ">"),
                                                  count=1, block=_ms(min(left, self.opts.block_s)))
                got = self._parse(reply)
                if got and len(got) < max_n:
                    got += await self._read(kind, max_n - len(got))
        return got

    async def _ensure_groups(self, kind: str) -> None:
        for stream in self.keys.streams(kind):
            if stream in self._groups:
                continue
            try:
                await self._r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
            self._groups.add(stream)

    async def _read(self, kind: str, n: int) -> list[_Delivery]:
        """Up to ``n`` new entries without blocking, the high band first."""
        out: list[_Delivery] = []
        for stream in self.keys.streams(kind):
            if len(out) >= n:
                break
            reply = await self._r.xreadgroup(GROUP, self.worker_id, {stream: ">"}, count=n - len(out))
            out += self._parse(reply)
        return out

    @staticmethod
    def _parse(reply: Any, times: dict[str, int] | None = None) -> list[_Delivery]:
        out = []
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                if not fields:
                    continue
                tries = int(fields.get(b"tries", b"0"))
                seen = (times or {}).get(_s(entry_id), 1)
                job_id, raw = _s(fields.get(b"id", b"")), fields.get(b"job", b"")
                out.append(_Delivery(_s(stream), _s(entry_id), job_id, raw, tries, tries + seen))
        return out

    async def _reclaim(self, kind: str, max_n: int) -> list[_Delivery]:
        """Entries idle past ``reclaim_s`` (their worker stopped refreshing them: dead) become ours."""
        out: list[_Delivery] = []
        for stream in self.keys.streams(kind):
            if len(out) >= max_n:
                break
            reply = await self._r.xautoclaim(stream, GROUP, self.worker_id, _ms(self.opts.reclaim_s),
                                             start_id="0-0", count=max_n - len(out))
            entries = reply[1] if len(reply) > 1 else []
            if not entries:
                continue
            pipe = self._r.pipeline(transaction=False)
            for entry_id, _ in entries:
                pipe.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
            pending = await pipe.execute()
            times = {_s(p[0]["message_id"]): int(p[0]["times_delivered"]) for p in pending if p}
            claimed = self._parse([(stream.encode(), entries)], times)
            for d in claimed:
                log.warning("reclaimed job %s from %s (delivery %d): its worker stopped", d.job_id, stream,
                            d.deliveries)
            out += claimed
        return out

    async def _admit(self, got: list[_Delivery]) -> list[Job]:
        """Mark deliveries running; skip ended ones, dead-letter exhausted ones, fail expired ones."""
        if not got:
            return []
        now = time.time()
        pipe = self._r.pipeline(transaction=False)
        for d in got:
            await self._claim(keys=[self.keys.job(d.job_id), self.keys.events(d.job_id)],
                              args=[now, self.worker_id, d.deliveries, EVENTS_MAXLEN, _event_json(
                                  d.job_id, "running", worker=self.worker_id, delivery=d.deliveries)],
                              client=pipe)
        statuses = [_s(s) for s in await pipe.execute()]
        jobs: list[Job] = []
        for d, status in zip(got, statuses, strict=True):
            if status in TERMINAL:  # cancelled while queued, or a duplicate of an ended job
                await self._r.xack(d.stream, GROUP, d.entry)
                continue
            try:
                job = job_from_bytes(d.raw)
            except Exception as e:
                unreadable = InternalError(f"unreadable job message: {e}")
                await self._end(d, None, "failed", error=unreadable, dead=True)
                continue
            self._held[job.id] = d
            if d.deliveries > self.opts.max_deliveries:
                await self._end(d, job, "failed", dead=True, error=ModelFailed(
                    f"gave up after {d.deliveries - 1} deliveries: the workers running it stopped (crashed?)"))
                continue
            job.taken_at = now
            if job.expired(now):
                await self._end(d, job, "failed", error=DeadlineExceeded("deadline passed while queued"))
                continue
            jobs.append(job)
        return jobs

    async def complete(self, job: Job, result: JobResult) -> None:
        d = self._held.get(job.id)
        raw = result_to_bytes(result)
        # A job another worker reclaimed (we were presumed dead) still gets its result if we are first, but
        # its delivery is no longer ours to acknowledge.
        entry = None if job.id in self._lost else d
        await self._until_done("complete", lambda: self._end(entry, job, "completed", result=raw, held=d))

    async def fail(self, job: Job, error: BaseException) -> None:
        if self._forget_lost(job):
            return
        d = self._held.get(job.id)
        if not isinstance(error, TokservError):
            error = ModelFailed(f"the model failed on this request: {type(error).__name__}: {error}")
        retry = isinstance(error, ModelFailed) and d is not None
        if retry and d is not None and d.deliveries < self.opts.max_deliveries:
            log.warning("job %s failed delivery %d of %d, queued again: %s", job.id, d.deliveries,
                        self.opts.max_deliveries, error.message)
            await self._until_done("retry", lambda: self._requeue_delivery(d, d.deliveries, error, "retry"))
            return
        if retry:
            error = ModelFailed(f"{error.message} (failed {self.opts.max_deliveries} deliveries; moved to the "
                                "dead-letter stream)")
        await self._until_done("fail", lambda: self._end(d, job, "failed", error=error, dead=retry))

    def _forget_lost(self, job: Job) -> bool:
        """A job another worker reclaimed is theirs now: nothing to hand back or retry here."""
        if job.id not in self._lost:
            return False
        self._lost.discard(job.id)
        self._held.pop(job.id, None)
        return True

    async def hand_back(self, job: Job) -> None:
        if self._forget_lost(job):
            return
        d = self._held.get(job.id)
        if d is not None:
            await self._until_done("hand back",
                                   lambda: self._requeue_delivery(d, d.tries, None, "handed back"))

    async def cancelled(self, jobs: Sequence[Job]) -> set[str]:
        held = [j for j in jobs if j.id in self._held]
        if not held:
            return set()
        try:
            pipe = self._r.pipeline(transaction=False)
            for j in held:
                pipe.hget(self.keys.job(j.id), "status")
            statuses = await pipe.execute()
            ended = {j.id for j, st in zip(held, statuses, strict=True)
                     if st is not None and _s(st) in TERMINAL}
            lost = {j.id for j in held if j.id in self._lost} - ended
            pipe = self._r.pipeline(transaction=False)
            for job_id in ended:
                d = self._held.pop(job_id)
                if job_id not in self._lost:  # a reclaimed delivery is the new owner's to acknowledge
                    pipe.xack(d.stream, GROUP, d.entry)
                self._lost.discard(job_id)
            for job_id in lost:
                self._held.pop(job_id)
                self._lost.discard(job_id)
            if ended:
                await pipe.execute()
            return ended | lost
        except UNREACHABLE as e:
            self._log_outage(e)
            return set()

    async def progress(self, updates: Sequence[Progress]) -> None:
        tracked = [u for u in updates if u.job.tracked]
        if not tracked:
            return
        try:
            pipe = self._r.pipeline(transaction=False)
            for u in tracked:
                await self._progress(keys=[self.keys.job(u.job.id), self.keys.events(u.job.id)],
                                     args=[u.step, u.total, EVENTS_MAXLEN,
                                           _event_json(u.job.id, "running", step=u.step, steps=u.total)],
                                     client=pipe)
            await pipe.execute()
        except UNREACHABLE as e:
            self._log_outage(e)

    async def _end(self, d: _Delivery | None, job: Job | None, outcome: str, *, result: bytes = b"",
                   error: TokservError | None = None, dead: bool = False,
                   held: _Delivery | None = None) -> None:
        """End a job (the script ignores a job that already ended). ``d`` is the delivery to acknowledge
        (None: none of ours); ``held`` carries the stream and message when ``d`` is None."""
        d_info = d or held
        job_id = job.id if job is not None else (d_info.job_id if d_info else "")
        stream = d_info.stream if d_info is not None else self.keys.stream(job.kind if job else "", 1)
        err = json.dumps(to_wire(error)) if error is not None else ""
        data = _event_json(job_id, outcome, **({"error": to_wire(error)} if error is not None else {}))
        ended = await self._finish_script(
            keys=[self.keys.job(job_id), self.keys.result(job_id), self.keys.events(job_id), stream,
                  self.keys.idem(job.idempotency_key if job else None), self.keys.dead],
            args=[outcome, time.time(), _ms(self.opts.job_ttl_s), result, err, GROUP, d.entry if d else "",
                  EVENTS_MAXLEN, data, job_id, _ms(self.opts.idempotency_ttl_s),
                  (d_info.raw or b"-") if dead and d_info is not None else "", DEAD_MAXLEN,
                  d_info.deliveries if d_info else 0])
        self._held.pop(job_id, None)
        self._lost.discard(job_id)
        if not ended:
            self.duplicates += 1
            log.info("job %s had already ended: this %s result is dropped (exactly once)", job_id, outcome)

    async def _requeue_delivery(self, d: _Delivery, tries: int, error: TokservError | None, why: str) -> None:
        err = json.dumps(to_wire(error)) if error is not None else ""
        await self._requeue(
            keys=[self.keys.job(d.job_id), self.keys.events(d.job_id), d.stream],
            args=[GROUP, d.entry, d.raw, d.job_id, tries, err, self.opts.stream_maxlen, EVENTS_MAXLEN,
                  _event_json(d.job_id, "queued", reason=why, **({"error": to_wire(error)} if error else {}))])
        self._held.pop(d.job_id, None)
        self._lost.discard(d.job_id)

    # ================================================================== workers and readiness
    async def announce(self, kinds: Sequence[str], info: dict[str, Any]) -> None:
        self._announced = (list(kinds), dict(info))
        self._kinds.update(kinds)
        with contextlib.suppress(*UNREACHABLE):
            await self._beat()

    async def _beat(self) -> None:
        if self._announced is None:
            return
        kinds, info = self._announced
        body = json.dumps({"id": self.worker_id, "kinds": kinds, "time": time.time(), **info})
        pipe = self._r.pipeline(transaction=True)
        pipe.set(self.keys.worker(self.worker_id), body, px=_ms(3 * self.opts.heartbeat_s))
        pipe.sadd(self.keys.workers, self.worker_id)
        await pipe.execute()

    async def workers(self) -> list[dict[str, Any]]:
        """The live workers (their announcements); forgets the dead ones."""
        ids = [_s(i) for i in await self._r.smembers(self.keys.workers)]
        if not ids:
            return []
        bodies = await self._r.mget([self.keys.worker(i) for i in ids])
        dead = [i for i, b in zip(ids, bodies, strict=True) if b is None]
        if dead:
            await self._r.srem(self.keys.workers, *dead)
        return [json.loads(b) for b in bodies if b is not None]

    async def ready(self) -> bool:
        """Redis answers and a live worker serves every kind this API serves (else 503 saying why)."""
        with self._api():
            live = await self.workers()
        served = {k for w in live for k in w.get("kinds", [])}
        missing = sorted({k.partition(":")[2] for k in self.kinds_required if k not in served})
        if missing:
            raise NotReady(f"no live worker serves {', '.join(missing)} ({len(live)} worker(s) alive)",
                           retry_after=self.opts.retry_after_s)
        return True

    def depths(self) -> dict[str, int]:
        return dict(self._depths)

    async def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        """The newest dead-lettered jobs: ``{"entry", "id", "error", "deliveries", "time", "stream"}``."""
        out = []
        for entry_id, f in await self._r.xrevrange(self.keys.dead, count=count):
            out.append({"entry": _s(entry_id), "id": _s(f[b"id"]), "error": json.loads(f[b"error"] or b"{}"),
                        "deliveries": int(f[b"deliveries"]), "time": float(f[b"time"]),
                        "stream": _s(f[b"stream"])})
        return out

    # ================================================================== background work
    async def _maintain(self) -> None:
        """Heartbeats, idle-time refresh of held jobs, queue depths, trimming; survives outages."""
        tick = min(self.opts.heartbeat_s, self.opts.reclaim_s / 3, 1.0)
        next_trim = time.monotonic() + 10.0
        while True:
            try:
                await self._beat()
                await self._touch_held()
                if self._kinds:
                    self._depths = await self._waiting(sorted(self._kinds))
                if self._announced is not None and time.monotonic() >= next_trim:
                    next_trim = time.monotonic() + 30.0
                    await self._trim()
            except asyncio.CancelledError:
                raise
            except UNREACHABLE as e:
                self._log_outage(e)
            except Exception:
                log.exception("Redis maintenance failed; continuing")
            await asyncio.sleep(tick)

    async def _touch_held(self) -> None:
        by_stream: dict[str, list[str]] = {}
        for d in self._held.values():
            by_stream.setdefault(d.stream, []).append(d.entry)
        entry_job = {d.entry: d.job_id for d in self._held.values()}
        for stream, entries in by_stream.items():
            lost = await self._touch(keys=[stream], args=[GROUP, self.worker_id, *entries])
            for entry in lost or []:
                job_id = entry_job.get(_s(entry))
                if job_id is not None and job_id not in self._lost:
                    log.warning("job %s was reclaimed by another worker; dropping it here", job_id)
                    self._lost.add(job_id)

    async def _trim(self) -> None:
        """Drop acknowledged entries: everything older than the oldest pending and the last delivered one."""
        for kind in sorted(self._kinds):
            for stream in self.keys.streams(kind):
                if stream not in self._groups:
                    continue
                groups = [g for g in await self._r.xinfo_groups(stream) if _s(g["name"]) == GROUP]
                if not groups:
                    continue
                floor = _s(groups[0]["last-delivered-id"])
                pending = await self._r.xpending(stream, GROUP)
                if pending and pending.get("pending"):
                    floor = min(floor, _s(pending["min"]), key=_id_key)
                await self._r.xtrim(stream, minid=floor, approximate=False)
                for c in await self._r.xinfo_consumers(stream, GROUP):
                    name = _s(c["name"])
                    stale = not c["pending"] and c["idle"] > 10_000 * self.opts.reclaim_s
                    if stale and name != self.worker_id and not await self._r.exists(self.keys.worker(name)):
                        await self._r.xgroup_delconsumer(stream, GROUP, name)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _info(h: dict[bytes, bytes], result: JobResult | None) -> JobInfo:
    def f(name: str) -> str | None:
        v = h.get(name.encode())
        return None if v is None or v == b"" else _s(v)

    def num(name: str) -> float | None:
        v = f(name)
        return None if v is None else float(v)

    error = f("error")
    step, steps = f("step"), f("steps")
    return JobInfo(id=f("id") or "", op=f("op") or "", model=f("model") or "", status=f("status") or "",
                   request_id=f("request_id") or "", priority=int(f("priority") or 0),
                   submitted_at=num("submitted_at") or 0.0, deadline=num("deadline"),
                   meta=json.loads(f("meta") or "{}"),
                   started_at=num("started_at"), finished_at=num("finished_at"),
                   step=None if step is None else int(step), steps=None if steps is None else int(steps),
                   deliveries=int(f("deliveries") or 0), error=None if error is None else json.loads(error),
                   result=result)
