"""The hostile corpus and the control-field regressions against an API process in Redis mode (real
``python -m server`` with REDIS_URL, a real worker process): every case gets its documented 4xx (non-finite
deadlines used to be a 500 at submit here), event ids (``Last-Event-ID``) are checked against Redis's form,
and SIGTERM answers a waiting caller with a JSON 503 + Retry-After within the grace while its job stays
queued for the workers."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hostile_corpus import BODY_LIMIT, cases
from redis_testkit import RedisServer, Workers
from server_testkit import RunningServer, start_server
from test_server_hostile import check, send

pytestmark = pytest.mark.redis
GRACE_S = 1.5


@dataclass
class Stack:
    redis: RedisServer
    api: RunningServer


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("redis-hostile")
    redis = RedisServer(folder / "redis").start()
    workers = Workers(redis.url, folder, env={"TOKSERVE_MAX_BATCH_SIZE": "1", "TOKSERVE_MAX_STEPS": "5000",
                                             "TOKSERVE_SHUTDOWN_GRACE_S": "1"})
    workers.start("w1")
    try:
        workers.wait_announced(["w1"])
        api = start_server(folder, {"TOKSERVE_REDIS_URL": redis.url, "TOKSERVE_MAX_BODY_BYTES": str(BODY_LIMIT),
                                    "TOKSERVE_MAX_STEPS": "5000", "TOKSERVE_SHUTDOWN_GRACE_S": str(GRACE_S)})
        try:
            yield Stack(redis, api)
        finally:
            api.stop()
    finally:
        workers.stop_all()
        redis.stop()


def test_hostile_corpus_in_redis_mode(stack: Stack) -> None:
    with httpx.Client(base_url=stack.api.url, timeout=60) as c:
        problems = [p for case in cases() if (p := check(case, send(c, case)))]
    assert not problems, "\n".join(problems)
    assert "Traceback" not in stack.api.log()


def test_event_ids_are_checked_against_redis_stream_ids(stack: Stack) -> None:
    with httpx.Client(base_url=stack.api.url, timeout=60) as c:
        job = c.post("/v1/jobs", json={"op": "generate", "class": 1, "steps": 2, "deadline_ms": 86_400_000})
        assert job.status_code == 202, job.text
        events = f"/v1/jobs/{job.json()['id']}/events"
        end = time.time() + 60
        while c.get(f"/v1/jobs/{job.json()['id']}").json()["status"] not in ("completed", "failed"):
            assert time.time() < end
            time.sleep(0.1)
        first_id = next(line[4:] for line in c.get(events).text.splitlines() if line.startswith("id: "))
        assert "-" in first_id
        resumed = c.get(events, headers={"last-event-id": first_id})
        assert resumed.status_code == 200 and f"id: {first_id}\n" not in resumed.text
        for bad in ("5", "99999999999999999999-1", "1-99999999999999999999", "1-2-3"):
            r = c.get(events, headers={"last-event-id": bad})
            assert r.status_code == 422 and "event" in r.json()["error"]["message"].lower(), (bad, r.text)


def test_sigterm_answers_waiting_callers_503_and_leaves_their_jobs_queued(stack: Stack, tmp_path: Path) -> None:
    api = stack.api
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.post, f"{api.url}/v1/generate", json={"class": 1, "steps": 5000, "seed": 1},
                              headers={"idempotency-key": "redis-shutdown-1"}, timeout=60)
        time.sleep(1.0)
        t0 = time.monotonic()
        api.proc.send_signal(signal.SIGTERM)
        r = waiting.result(timeout=30)
        api.proc.wait(30)
        took = time.monotonic() - t0
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["type"] == "shutting_down" and "stays queued" in r.json()["error"]["message"]
    assert took < GRACE_S + 2.0, took
    assert "Traceback" not in api.log()
    jobs = [k for k in stack.redis.client().scan_iter("tokserve:job:*")]
    assert jobs  # the job is still in Redis for the workers
