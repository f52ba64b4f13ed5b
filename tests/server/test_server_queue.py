"""The in-process queue (capacity, deadlines, idempotency, shutdown) and the wire format for other backends."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from models.sampling.base import SampleRequest
from server.errors import DeadlineExceeded, InvalidValue, ModelFailed, QueueFull, ShuttingDown
from server.queue import DecodePayload, EncodePayload, GeneratePayload, InProcessQueue, Job, JobResult
from server.queue.wire import job_from_bytes, job_to_bytes, result_from_bytes, result_to_bytes


def _job(model: str = "tok", rows: int = 1, **kw: object) -> Job:
    return Job(model=model, payload=DecodePayload(torch.zeros(rows, 4, 3)), request_id="r", **kw)  # type: ignore[arg-type]


def _result(v: float = 1.0) -> JobResult:
    return JobResult({"images": torch.full((1, 3, 2, 2), v)}, queue_ms=1.0, compute_ms=2.0)


async def _serve_once(q: InProcessQueue, kind: str, value: float = 1.0) -> list[Job]:
    jobs = await q.take(kind, 10, 1.0)
    for j in jobs:
        await q.complete(j, _result(value))
    return jobs


def test_submit_take_complete() -> None:
    async def main() -> None:
        q = InProcessQueue(4)
        job = _job()
        task = asyncio.create_task(q.submit(job))
        taken = await q.take("decode:tok", 8, 1.0)
        assert [j.id for j in taken] == [job.id] and taken[0].taken_at is not None
        await q.complete(taken[0], _result(3.0))
        res = await task
        assert float(res.tensors["images"][0, 0, 0, 0]) == 3.0
        assert q.in_flight() == 0 and q.depths() == {"decode:tok": 0}

    asyncio.run(main())


def test_take_times_out_empty_and_respects_kind_and_max_n() -> None:
    async def main() -> None:
        q = InProcessQueue(8)
        t0 = time.monotonic()
        assert await q.take("decode:tok", 4, 0.05) == []
        assert time.monotonic() - t0 >= 0.04
        tasks = [asyncio.create_task(q.submit(_job())) for _ in range(3)]
        other = asyncio.create_task(q.submit(_job("other")))
        await asyncio.sleep(0)
        first = await q.take("decode:tok", 2, 0)
        assert len(first) == 2
        rest = await q.take("decode:tok", 5, 0)
        assert len(rest) == 1
        for j in first + rest + await q.take("decode:other", 5, 0):
            await q.complete(j, _result())
        await asyncio.gather(*tasks, other)

    asyncio.run(main())


def test_take_wakes_when_a_job_arrives() -> None:
    async def main() -> None:
        q = InProcessQueue(8)
        taker = asyncio.create_task(q.take("decode:tok", 4, 5.0))
        await asyncio.sleep(0.01)
        sub = asyncio.create_task(q.submit(_job()))
        t0 = time.monotonic()
        jobs = await taker
        assert len(jobs) == 1 and time.monotonic() - t0 < 1.0
        await q.complete(jobs[0], _result())
        await sub

    asyncio.run(main())


def test_capacity_gives_queue_full_with_retry_after() -> None:
    async def main() -> None:
        q = InProcessQueue(2, retry_after_s=3)
        tasks = [asyncio.create_task(q.submit(_job())) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as e:
            await q.submit(_job())
        assert e.value.retry_after == 3
        # taken jobs free capacity
        taken = await q.take("decode:tok", 1, 0)
        t3 = asyncio.create_task(q.submit(_job()))
        await asyncio.sleep(0)
        assert q.depths()["decode:tok"] == 2
        for j in taken + await q.take("decode:tok", 5, 0):
            await q.complete(j, _result())
        await asyncio.gather(*tasks, t3)

    asyncio.run(main())


def test_deadline_while_queued_gives_504_and_job_is_dropped() -> None:
    async def main() -> None:
        q = InProcessQueue(4)
        with pytest.raises(DeadlineExceeded):
            await q.submit(_job(deadline=time.time() + 0.05))
        assert await q.take("decode:tok", 4, 0) == []
        assert q.in_flight() == 0

    asyncio.run(main())


def test_deadline_while_running_marks_job_cancelled_for_the_worker() -> None:
    async def main() -> None:
        q = InProcessQueue(4)
        task = asyncio.create_task(q.submit(_job(deadline=time.time() + 0.1)))
        taken = await q.take("decode:tok", 4, 1.0)
        assert await q.cancelled(taken) == set()
        with pytest.raises(DeadlineExceeded):
            await task
        assert await q.cancelled(taken) == {taken[0].id}
        await q.complete(taken[0], _result())  # late completion is ignored

    asyncio.run(main())


def test_fail_maps_errors() -> None:
    async def main() -> None:
        q = InProcessQueue(4)
        t1 = asyncio.create_task(q.submit(_job()))
        t2 = asyncio.create_task(q.submit(_job()))
        a, b = await q.take("decode:tok", 2, 1.0)
        await q.fail(a, RuntimeError("boom"))
        await q.fail(b, InvalidValue("bad tokens"))
        with pytest.raises(ModelFailed, match="boom"):
            await t1
        with pytest.raises(InvalidValue):
            await t2

    asyncio.run(main())


def test_idempotency_runs_once_even_concurrently() -> None:
    async def main() -> None:
        q = InProcessQueue(4, idempotency_ttl_s=60)
        first = asyncio.create_task(q.submit(_job(idempotency_key="k", fingerprint="f")))
        second = asyncio.create_task(q.submit(_job(idempotency_key="k", fingerprint="f")))
        await asyncio.sleep(0)
        jobs = await _serve_once(q, "decode:tok", 7.0)
        assert len(jobs) == 1
        r1, r2 = await asyncio.gather(first, second)
        assert r1 is r2
        r3 = await q.submit(_job(idempotency_key="k", fingerprint="f"))  # after completion: kept result
        assert r3 is r1 and await q.take("decode:tok", 4, 0) == []
        with pytest.raises(InvalidValue, match="different request"):
            await q.submit(_job(idempotency_key="k", fingerprint="other"))

    asyncio.run(main())


def test_idempotency_ttl_and_failed_jobs_run_again() -> None:
    async def main() -> None:
        now = [1000.0]
        q = InProcessQueue(4, idempotency_ttl_s=10, clock=lambda: now[0])
        t = asyncio.create_task(q.submit(_job(idempotency_key="k", fingerprint="f")))
        await _serve_once(q, "decode:tok")
        await t
        now[0] += 11  # expired: runs again
        t = asyncio.create_task(q.submit(_job(idempotency_key="k", fingerprint="f")))
        assert len(await _serve_once(q, "decode:tok")) == 1
        await t
        t = asyncio.create_task(q.submit(_job(idempotency_key="e", fingerprint="f")))
        (j,) = await q.take("decode:tok", 1, 1.0)
        await q.fail(j, RuntimeError("x"))
        with pytest.raises(ModelFailed):
            await t
        t = asyncio.create_task(q.submit(_job(idempotency_key="e", fingerprint="f")))
        assert len(await _serve_once(q, "decode:tok")) == 1  # a failure is not remembered
        await t

    asyncio.run(main())


def test_close_drain_release() -> None:
    async def main() -> None:
        q = InProcessQueue(4)
        t1 = asyncio.create_task(q.submit(_job()))
        t2 = asyncio.create_task(q.submit(_job()))
        await asyncio.sleep(0)
        await q.close()
        with pytest.raises(ShuttingDown):
            await q.submit(_job())
        (a,) = await q.take("decode:tok", 1, 0)
        assert not await q.drain(0.05)  # two accepted, unfinished
        await q.complete(a, _result())
        await q.release()  # the other one is answered 503
        assert (await t1).compute_ms == 2.0
        with pytest.raises(ShuttingDown):
            await t2
        assert await q.drain(0.01)

    asyncio.run(main())


def test_wire_round_trip_every_payload() -> None:
    reqs = [SampleRequest(class_id=3, seed=5 + i, steps=4, cfg_scale=1.5, guidance_low=0.1, guidance_high=0.7,
                          sampler="euler", path_type="cosine") for i in range(2)]
    payloads = [EncodePayload(torch.rand(2, 3, 8, 8)), DecodePayload(torch.randn(1, 4, 3)),
                GeneratePayload(reqs, return_latents=True)]
    for p in payloads:
        job = Job(model="m", payload=p, request_id="rid", deadline=123.5, idempotency_key="k", fingerprint="f")
        back = job_from_bytes(job_to_bytes(job))
        assert (back.id, back.model, back.kind, back.deadline, back.idempotency_key) == (
            job.id, "m", job.kind, 123.5, "k")
        if isinstance(p, GeneratePayload):
            assert back.payload.requests == reqs and back.payload.return_latents  # type: ignore[union-attr]
        else:
            name = "images" if isinstance(p, EncodePayload) else "tokens"
            assert torch.equal(getattr(back.payload, name), getattr(p, name))
    res = JobResult({"images": torch.rand(1, 3, 4, 4), "latents": torch.randn(1, 4, 3)}, 1.5, 2.5)
    back_r = result_from_bytes(result_to_bytes(res))
    assert back_r.queue_ms == 1.5 and all(torch.equal(back_r.tensors[k], v) for k, v in res.tensors.items())
