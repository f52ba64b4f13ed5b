"""The Redis Streams backend at its interface (``JobQueue``), against a real redis-server: batched reads,
results written once, retries and the dead-letter stream, reclaiming from a dead consumer, idempotency
(also concurrent), cancellation, priority bands, expiry, trimming, and fast 503s while Redis is down.
No model runs here: the test plays the worker (test_redis_workers.py runs real worker processes)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
import torch
from redis_testkit import RedisServer, port_closed

from server.errors import BackendUnavailable, DeadlineExceeded, InvalidValue, ModelFailed, QueueFull
from server.queue.base import DecodePayload, Job, JobResult, Progress
from server.queue.redis import RedisOptions, RedisQueue

pytestmark = pytest.mark.redis
KIND = "decode:tok"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


def _opts(server: RedisServer, **kw: object) -> RedisOptions:
    base = {"url": server.url, "prefix": f"t{uuid.uuid4().hex[:8]}", "reclaim_s": 30.0, "max_deliveries": 3,
            "job_ttl_s": 60.0, "worker_id": "w1"}
    return RedisOptions(**{**base, **kw})  # type: ignore[arg-type]


_open: list[RedisQueue] = []


def _q(opts: RedisOptions, kinds: list[str] | None = None) -> RedisQueue:
    q = RedisQueue(opts, kinds or [])
    _open.append(q)
    return q


def _run(main) -> None:  # type: ignore[no-untyped-def]
    async def wrapped() -> None:
        try:
            await main()
        finally:
            while _open:
                await _open.pop().release()

    asyncio.run(wrapped())


def _job(value: float = 0.0, **kw: object) -> Job:
    return Job(model="tok", payload=DecodePayload(torch.full((1, 4, 3), value)), request_id="rid",
               deadline=time.time() + 30, **kw)  # type: ignore[arg-type]


def _result(job: Job) -> JobResult:
    return JobResult({"images": job.payload.tokens.sum().reshape(1, 1, 1, 1)}, queue_ms=1.0, compute_ms=2.0)  # type: ignore[union-attr]


async def _until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.02)


def test_batched_take_and_results_written_once(server: RedisServer) -> None:
    async def main() -> None:
        opts = _opts(server)
        api, worker = _q(opts, [KIND]), _q(opts)
        jobs = [_job(float(i)) for i in range(5)]
        calls = [asyncio.create_task(api.submit(j)) for j in jobs]
        await _until(lambda: _waiting(api, 5))
        taken = await worker.take(KIND, 8, 1.0)  # one XREADGROUP fills the batch
        assert sorted(j.id for j in taken) == sorted(j.id for j in jobs)
        assert all(j.taken_at is not None for j in taken)
        for j in taken:
            await worker.complete(j, _result(j))
        results = await asyncio.gather(*calls)
        assert [float(r.tensors["images"].sum()) for r in results] == [12.0 * i for i in range(5)]
        await worker.complete(taken[0], _result(taken[0]))  # a second result for the same job is dropped
        assert worker.duplicates == 1
        r = server.client()
        types = [f[b"type"] for _, f in r.xrange(f"{opts.prefix}:ev:{taken[0].id}")]
        assert types == [b"completed"]  # sync jobs log only their end, once
        assert r.pttl(f"{opts.prefix}:res:{taken[0].id}") <= 60_000
        assert r.xpending(f"{opts.prefix}:q:{KIND}:p1", "workers")["pending"] == 0

    _run(main)


async def _waiting(q: RedisQueue, n: int) -> bool:
    return (await q._waiting([KIND]))[KIND] >= n


def test_model_error_retried_then_dead_lettered_with_500(server: RedisServer) -> None:
    async def main() -> None:
        opts = _opts(server, max_deliveries=3)
        api, worker = _q(opts, [KIND]), _q(opts)
        job = _job(1.0)
        call = asyncio.create_task(api.submit(job))
        deliveries = 0
        for _ in range(3):
            (taken,) = await worker.take(KIND, 4, 2.0)
            deliveries += 1
            assert worker._held[taken.id].deliveries == deliveries
            await worker.fail(taken, RuntimeError("poisoned input"))
        with pytest.raises(ModelFailed, match="dead-letter") as err:
            await call
        assert "poisoned input" in err.value.message
        assert await worker.take(KIND, 4, 0.2) == []  # not delivered a 4th time
        (dead,) = await worker.dead_letters()
        assert dead["id"] == job.id and dead["deliveries"] == 3 and "poisoned input" in dead["error"]["message"]

    _run(main)


def test_dead_consumer_jobs_are_reclaimed_and_counted(server: RedisServer) -> None:
    async def main() -> None:
        opts = _opts(server, reclaim_s=0.4)
        api = _q(opts, [KIND])
        dead = _q(RedisOptions(**{**opts.__dict__, "worker_id": "dead"}))
        live = _q(RedisOptions(**{**opts.__dict__, "worker_id": "live"}))
        jobs = [_job(float(i), tracked=True) for i in range(3)]
        ids = [await api.enqueue(j) for j in jobs]
        held = await dead.take(KIND, 8, 1.0)  # then it dies: nothing refreshes its deliveries
        assert len(held) == 3
        assert await live.take(KIND, 8, 0.1) == []  # not idle long enough yet
        await asyncio.sleep(0.5)
        got = await live.take(KIND, 8, 1.0)
        assert sorted(j.id for j in got) == sorted(ids)
        assert {live._held[j.id].deliveries for j in got} == {2}
        for j in got:
            await live.complete(j, _result(j))
        await dead.complete(held[0], _result(held[0]))  # the presumed-dead worker finishes late: dropped
        assert dead.duplicates == 1
        r = server.client()
        for i in ids:
            info = await api.info(i)
            assert info is not None and info.status == "completed" and info.deliveries == 2
            types = [f[b"type"].decode() for _, f in r.xrange(f"{opts.prefix}:ev:{i}")]
            assert types.count("completed") == 1 and types[0] == "queued" and types.count("started") == 2

    _run(main)


def test_live_worker_keeps_its_jobs_past_the_reclaim_time(server: RedisServer) -> None:
    async def main() -> None:
        opts = _opts(server, reclaim_s=1.0)
        api = _q(opts, [KIND])
        owner = _q(RedisOptions(**{**opts.__dict__, "worker_id": "owner"}))
        other = _q(RedisOptions(**{**opts.__dict__, "worker_id": "other"}))
        await owner.open()  # its maintenance resets the idle time of what it holds
        job_id = await api.enqueue(_job(2.0))
        (job,) = await owner.take(KIND, 1, 1.0)
        for _ in range(8):
            await asyncio.sleep(0.2)
            assert await other.take(KIND, 1, 0.0) == []
        await owner.complete(job, _result(job))
        assert (await api.info(job_id)).status == "completed"  # type: ignore[union-attr]

    _run(main)


def test_idempotency_key_runs_once_even_concurrently(server: RedisServer) -> None:
    async def main() -> None:
        opts = _opts(server)
        apis = [_q(opts, [KIND]) for _ in range(3)]  # three API processes
        worker = _q(opts)
        calls = [asyncio.create_task(q.submit(_job(3.0, idempotency_key="k1", fingerprint="f"))) for q in apis]
        await asyncio.sleep(0.3)
        taken = await worker.take(KIND, 8, 1.0)
        assert len(taken) == 1
        await worker.complete(taken[0], _result(taken[0]))
        results = await asyncio.gather(*calls)
        assert {float(r.tensors["images"].sum()) for r in results} == {36.0}
        again = await apis[0].submit(_job(3.0, idempotency_key="k1", fingerprint="f"))  # kept result
        assert float(again.tensors["images"].sum()) == 36.0
        assert await worker.take(KIND, 8, 0.2) == []
        with pytest.raises(InvalidValue, match="different request"):
            await apis[1].submit(_job(3.0, idempotency_key="k1", fingerprint="other"))
        # a failed job is not remembered: the same key runs again
        call = asyncio.create_task(apis[0].submit(_job(3.0, idempotency_key="k2", fingerprint="f")))
        (t,) = await worker.take(KIND, 8, 1.0)
        await worker.fail(t, DeadlineExceeded("late"))
        with pytest.raises(DeadlineExceeded):
            await call
        call = asyncio.create_task(apis[0].submit(_job(3.0, idempotency_key="k2", fingerprint="f")))
        (t2,) = await worker.take(KIND, 8, 1.0)
        assert t2.id != t.id
        await worker.complete(t2, _result(t2))
        await call

    _run(main)


def test_cancel_queued_and_running_jobs_and_progress_events(server: RedisServer) -> None:
    async def main() -> None:
        opts = _opts(server)
        api, worker = _q(opts, [KIND]), _q(opts)
        queued_id = await api.enqueue(_job(1.0))
        info = await api.cancel(queued_id)
        assert info is not None and info.status == "cancelled"
        assert await worker.take(KIND, 4, 0.2) == []  # cancelled while queued: acknowledged, never runs
        running_id = await api.enqueue(_job(2.0))
        (job,) = await worker.take(KIND, 4, 1.0)
        await worker.progress([Progress(job, 1, 10), Progress(job, 2, 10)])
        assert await worker.cancelled([job]) == set()
        await api.cancel(running_id)
        assert await worker.cancelled([job]) == {running_id}
        assert job.id not in worker._held
        events = await api.events(running_id, None, 0.0)
        assert [e.type for e in events] == ["queued", "started", "step", "step", "cancelled"]  # type: ignore[union-attr]
        assert events[3].data["step"] == 2 and events[3].data["steps"] == 10  # type: ignore[index]
        after = await api.events(running_id, events[1].id, 0.0)  # type: ignore[index]
        assert [e.id for e in after] == [e.id for e in events[2:]]  # type: ignore[union-attr,index]
        assert await api.info("no-such-job") is None and await api.events("no-such-job", None, 0) is None

    _run(main)


def test_priority_bands_and_capacity(server: RedisServer) -> None:
    async def main() -> None:
        opts = _opts(server, capacity=3)
        api, worker = _q(opts, [KIND]), _q(opts)
        low, normal, high = [await api.enqueue(_job(float(p), priority=p)) for p in (-5, 0, 7)]
        with pytest.raises(QueueFull):
            await api.enqueue(_job())
        order = [(await worker.take(KIND, 1, 1.0))[0].id for _ in range(3)]
        assert order == [high, normal, low]
        assert (await api._waiting([KIND]))[KIND] == 0

    _run(main)


def test_expiry_and_trimming(server: RedisServer) -> None:
    async def main() -> None:
        # a TTL long enough that a loaded CI box finishes the 30 jobs and the trim before the first one expires
        opts = _opts(server, job_ttl_s=3.0)
        api, worker = _q(opts, [KIND]), _q(opts)
        ids = [await api.enqueue(_job(float(i))) for i in range(30)]
        while True:
            taken = await worker.take(KIND, 16, 0.2)
            if not taken:
                break
            for j in taken:
                await worker.complete(j, _result(j))
        r = server.client()
        s = f"{opts.prefix}:q:{KIND}:p1"
        assert r.xlen(s) == 30
        await worker._trim()  # acknowledged entries go
        assert r.xlen(s) < 30
        assert (await api.info(ids[0])).status == "completed"  # type: ignore[union-attr]
        deadline = time.monotonic() + 15.0
        while await api.info(ids[0]) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        assert await api.info(ids[0]) is None  # results and state expire
        assert not r.exists(f"{opts.prefix}:res:{ids[0]}")

    _run(main)


def test_unreachable_redis_answers_503_fast() -> None:
    async def main() -> None:
        q = _q(RedisOptions(url=f"redis://127.0.0.1:{port_closed()}/0", prefix="x"), [KIND])
        for _ in range(3):
            t0 = time.monotonic()
            with pytest.raises(BackendUnavailable) as e:
                await q.submit(_job())
            assert time.monotonic() - t0 < 0.5 and e.value.retry_after == 1.0
        with pytest.raises(BackendUnavailable):
            await q.ready()
        t0 = time.monotonic()
        assert await q.take(KIND, 4, 0.3) == []  # a worker rides it out
        assert time.monotonic() - t0 < 1.5

    _run(main)


def test_readiness_needs_a_live_worker_per_kind(server: RedisServer) -> None:
    from server.errors import NotReady

    async def main() -> None:
        opts = _opts(server, heartbeat_s=0.2)
        api = _q(opts, [KIND, "encode:tok"])
        worker = _q(opts)
        with pytest.raises(NotReady, match="no live worker"):
            await api.ready()
        await worker.open()
        await worker.announce([KIND, "encode:tok"], {"models": ["tok"]})
        assert await api.ready()
        assert [w["id"] for w in await api.workers()] == ["w1"]
        await worker.release()  # withdraws
        with pytest.raises(NotReady):
            await api.ready()

    _run(main)
