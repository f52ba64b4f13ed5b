"""Priority, deadlines, progress and cancellation below HTTP: the step scheduler's join order and progress
reports, and the in-process queue's priority lanes, tracked-job events, cancellation and the wire format of
the new job fields."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from test_server_scheduler import CountingSampler, _sched

from models.sampling.base import SampleRequest
from server.errors import DeadlineExceeded, ModelFailed
from server.queue import DecodePayload, GeneratePayload, InProcessQueue, Job, JobResult
from server.queue.base import Progress
from server.queue.wire import job_from_bytes, job_to_bytes


def _gen(seed: int, steps: int = 2, rows: int = 1, **kw: object) -> Job:
    reqs = [SampleRequest(class_id=0, seed=seed + i, steps=steps, sampler="count") for i in range(rows)]
    return Job(model="gen", payload=GeneratePayload(reqs), request_id=f"s{seed}", **kw)  # type: ignore[arg-type]


def test_waiting_rows_join_by_priority_then_deadline_then_admission() -> None:
    s = _sched(CountingSampler(), max_rows=1)
    now = time.time()
    jobs = [_gen(1, priority=0, deadline=now + 50), _gen(2, priority=0, deadline=now + 10), _gen(3, priority=-1),
            _gen(4, priority=3), _gen(5, priority=0, deadline=now + 10)]
    for j in jobs:
        s.admit(j)
    order = []
    for _ in range(20):
        for job, _, _ in s.step().finished:
            order.append(job.request_id)
    assert order == ["s4", "s2", "s5", "s1", "s3"]


def test_progress_reports_the_slowest_row_once_per_step() -> None:
    s = _sched(CountingSampler(), max_rows=3)
    a, b = _gen(10, steps=3, rows=2), _gen(20, steps=2, rows=2)  # b's second row waits for room
    s.admit(a)
    s.admit(b)
    reports = [[(j.request_id, done, total) for j, done, total in s.step().progress] for _ in range(4)]
    assert reports[0] == [("s10", 1, 3)]  # b has a row that has not joined: its slowest row is at 0
    assert reports[1] == [("s10", 2, 3)]
    assert reports[2] == [("s10", 3, 3), ("s20", 1, 2)]  # b's second row joined when a's rows left
    assert reports[3] == [("s20", 2, 2)]


def _decode_job(**kw: object) -> Job:
    return Job(model="tok", payload=DecodePayload(torch.zeros(1, 4, 3)), request_id="r", **kw)  # type: ignore[arg-type]


def test_in_process_priority_lanes_and_tracked_events() -> None:
    async def main() -> None:
        q = InProcessQueue(8)
        ids = {p: await q.enqueue(_decode_job(priority=p)) for p in (0, -2, 5, 0)}
        taken = await q.take("decode:tok", 8, 0)
        assert [j.priority for j in taken] == [5, 0, 0, -2]
        job = taken[0]
        await q.progress([Progress(job, 1, 4)])
        await q.complete(job, JobResult({"images": torch.ones(1, 3, 2, 2)}))
        info = await q.info(ids[5])
        assert info is not None and info.status == "completed" and info.step == 1 and info.steps == 4
        assert info.result is not None and info.deliveries == 1
        events = await q.events(ids[5], None, 0)
        assert [e.type for e in events] == ["queued", "started", "step", "completed"]  # type: ignore[union-attr]
        assert [e.id for e in await q.events(ids[5], "2", 0)] == ["3", "4"]  # type: ignore[union-attr]
        await q.fail(taken[1], RuntimeError("boom"))
        failed = await q.info(taken[1].id)
        assert failed is not None and failed.error == {"type": "model_error", "message": failed.error["message"]}
        assert await q.info("nope") is None and await q.events("nope", None, 0) is None

    asyncio.run(main())


def test_in_process_cancel_queued_and_running() -> None:
    async def main() -> None:
        q = InProcessQueue(8)
        queued = await q.enqueue(_decode_job())
        running = await q.enqueue(_decode_job())
        info = await q.cancel(queued)
        assert info is not None and info.status == "cancelled"
        (job,) = await q.take("decode:tok", 8, 0)  # the cancelled one never runs
        assert job.id == running
        waiter = asyncio.create_task(q.events(running, "2", 5.0))
        await asyncio.sleep(0.01)
        await q.cancel(running)
        assert [e.type for e in await waiter] == ["cancelled"]  # type: ignore[union-attr]
        assert await q.cancelled([job]) == {running}
        await q.complete(job, JobResult({}))  # a late result does not undo the cancel
        assert (await q.info(running)).status == "cancelled"  # type: ignore[union-attr]
        assert await q.drain(0.1)

    asyncio.run(main())


def test_in_process_tracked_job_past_its_deadline_fails() -> None:
    async def main() -> None:
        q = InProcessQueue(8)
        job_id = await q.enqueue(_decode_job(deadline=time.time() + 0.05))
        await asyncio.sleep(0.1)
        assert await q.take("decode:tok", 8, 0) == []
        info = await q.info(job_id)
        assert info is not None and info.status == "failed" and info.error["type"] == "deadline_exceeded"  # type: ignore[index]
        with pytest.raises(DeadlineExceeded):
            await q.submit(_decode_job(deadline=time.time() - 1))
        with pytest.raises(ModelFailed):
            t = asyncio.create_task(q.submit(_decode_job()))
            (j,) = await q.take("decode:tok", 1, 1.0)
            await q.fail(j, RuntimeError("x"))
            await t

    asyncio.run(main())


def test_wire_carries_priority_tracking_and_meta() -> None:
    job = _gen(1, priority=-7, tracked=True, meta={"format": "webp", "generate": {"seed": 3}})
    back = job_from_bytes(job_to_bytes(job))
    assert (back.priority, back.tracked, back.meta) == (-7, True, {"format": "webp", "generate": {"seed": 3}})
