"""The jobs API and idempotency through Redis and a real worker process: the same Idempotency-Key (twice,
and concurrently from several clients) runs once; server-sent events replay what a reconnecting client
missed; a cancelled generation stops consuming steps (counted on the worker's /metrics) and frees its row;
priority bands order waiting jobs; results equal the synchronous routes'."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from jobs_testkit import check_hang_up_cancels, get, read_events, submit, wait_done, wait_step
from redis_testkit import PREFIX, RedisServer, Worker, Workers, stream
from server_testkit import ThreadServer, free_port

pytestmark = pytest.mark.redis
GEN = "generate:sit-tiny-64x32"


@dataclass
class Stack:
    redis: RedisServer
    worker: Worker
    metrics_url: str
    api: ThreadServer

    @property
    def url(self) -> str:
        return self.api.url

    def steps_run(self) -> int:
        text = httpx.get(f"{self.metrics_url}/metrics", timeout=10).text
        return int(sum(float(v) for v in re.findall(r"tokserve_denoise_step_seconds_count\{[^}]*\} (\S+)", text)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("jobs")
    redis = RedisServer(folder / "redis").start()
    port = free_port()
    workers = Workers(redis.url, folder, env={"TOKSERVE_MAX_BATCH_SIZE": "1", "TOKSERVE_METRICS_PORT": str(port)})
    w = workers.start("solo")
    try:
        workers.wait_announced(["solo"])
        with ThreadServer(REDIS_URL=redis.url, max_steps=20000) as api:
            yield Stack(redis, w, f"http://127.0.0.1:{port}", api)
    finally:
        workers.stop_all()
        redis.stop()


def test_same_idempotency_key_runs_once_also_concurrently(stack: Stack) -> None:
    r = stack.redis.client()
    before = r.xlen(stream(GEN))
    body = {"class": 9, "steps": 3}  # no seed: derived from the key, so every retry is the same request
    answers: list[httpx.Response] = []

    def post() -> None:
        answers.append(httpx.post(f"{stack.url}/v1/generate", json=body, headers={"Idempotency-Key": "idem-1"},
                                  timeout=60))

    threads = [threading.Thread(target=post) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answers.append(httpx.post(f"{stack.url}/v1/generate", json=body, headers={"Idempotency-Key": "idem-1"},
                              timeout=60))  # after it finished: the kept result
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert len({a.json()["images"][0]["data"] for a in answers}) == 1 and len({a.json()["seed"] for a in answers}) == 1
    assert r.xlen(stream(GEN)) - before == 1  # one job entered the queue
    other = httpx.post(f"{stack.url}/v1/generate", json={**body, "class": 8}, headers={"Idempotency-Key": "idem-1"})
    assert other.status_code == 422


def test_job_results_match_the_synchronous_routes(stack: Stack) -> None:
    tokens = np.random.default_rng(0).normal(size=(2, 64, 32)).astype(np.float32)
    body = {"shape": [2, 64, 32], "dtype": "float32", "data": tokens.ravel().tolist()}
    job = wait_done(stack.url, submit(stack.url, {"op": "decode", **body, "format": "npy"})["id"])
    sync = httpx.post(f"{stack.url}/v1/decode", json=body, headers={"accept": "application/x-npy"}, timeout=60)
    import io

    arr = np.load(io.BytesIO(sync.content))
    np.testing.assert_allclose(np.asarray(job["result"]["array"]["data"]).reshape(arr.shape), arr, atol=1e-5)
    gen = wait_done(stack.url, submit(stack.url, {"op": "generate", "class": 3, "seed": 4, "steps": 3,
                                                  "return_latents": True})["id"])
    sync_gen = httpx.post(f"{stack.url}/v1/generate", json={"class": 3, "seed": 4, "steps": 3, "return_latents": True},
                          timeout=60).json()
    np.testing.assert_allclose(gen["result"]["latents"]["data"], sync_gen["latents"]["data"], atol=1e-4)
    assert gen["deliveries"] == 1 and gen["progress"] == {"step": 3, "steps": 3}


def test_events_replay_after_reconnect(stack: Stack) -> None:
    job = submit(stack.url, {"op": "generate", "class": 1, "seed": 3, "steps": 300})
    first = read_events(stack.url, job["id"], limit=3)  # the client goes away after three events
    assert [e["event"] for e in first[:2]] == ["queued", "started"]
    wait_done(stack.url, job["id"])
    rest = read_events(stack.url, job["id"], last_event_id=first[-1]["id"])
    everything = read_events(stack.url, job["id"])
    assert [e["id"] for e in first + rest] == [e["id"] for e in everything]
    assert [e["data"]["step"] for e in everything if e["event"] == "step"] == list(range(1, 301))
    assert everything[-1]["event"] == "completed" and everything[1]["data"]["worker"] == "solo"


def test_cancel_stops_consuming_steps_and_frees_the_row(stack: Stack) -> None:
    url = stack.url
    before = stack.steps_run()
    long = submit(url, {"op": "generate", "class": 1, "seed": 1, "steps": 20000})
    wait_step(url, long["id"], 5)
    waiting = submit(url, {"op": "generate", "class": 2, "seed": 2, "steps": 3})
    time.sleep(0.3)
    assert get(url, waiting["id"])["status"] == "queued"  # one row (MAX_BATCH_SIZE=1) and it is taken
    cancelled = httpx.post(f"{url}/v1/jobs/{long['id']}/cancel", timeout=30).json()
    assert cancelled["status"] == "cancelled"
    assert wait_done(url, waiting["id"], 30)["status"] == "completed"  # the freed row ran it
    time.sleep(0.3)
    events = read_events(url, long["id"])
    last_step = max(e["data"]["step"] for e in events if e["event"] == "step")
    ran = stack.steps_run() - before - 3  # every step the cancelled job consumed
    at_cancel = cancelled["progress"]["step"]
    print(f"\ncancel through Redis: step {at_cancel} of 20000 when cancelled; it ran {ran} steps in all, "
          f"{ran - at_cancel} after the cancel was answered")
    assert events[-1]["event"] == "cancelled"  # no step event after it: a step in flight is not reported
    assert last_step <= ran <= last_step + 1
    assert ran - at_cancel <= 3  # the step in flight, and the one before the worker read the cancel
    text = httpx.get(f"{stack.metrics_url}/metrics", timeout=10).text
    assert 'tokserve_generation_rows{model="sit-tiny-64x32"} 0.0' in text
    assert not stack.redis.client().xpending(stream(GEN), "workers")["pending"]  # nothing held


def test_priority_bands_order_waiting_jobs(stack: Stack) -> None:
    url = stack.url
    blocker = submit(url, {"op": "generate", "class": 1, "seed": 1, "steps": 20000})
    wait_step(url, blocker["id"], 2)
    ids = {p: submit(url, {"op": "generate", "class": 3, "seed": 5, "steps": 2, "priority": p})["id"]
           for p in (-5, 0, 5)}
    httpx.post(f"{url}/v1/jobs/{blocker['id']}/cancel", timeout=30)
    started = {p: wait_done(url, i)["started_at"] for p, i in ids.items()}
    assert sorted(started, key=started.__getitem__) == [5, 0, -5]
    assert stack.redis.client().exists(f"{PREFIX}:q:{GEN}:p2", f"{PREFIX}:q:{GEN}:p0") == 2


def test_client_hang_up_cancels_its_row_on_the_worker_and_is_counted(stack: Stack) -> None:
    # the worker reads the cancel from Redis between steps: the step in flight and the one before it read it
    print("\n" + check_hang_up_cancels(stack.url, worker_url=stack.metrics_url, max_extra_steps=3))
    assert not stack.redis.client().xpending(stream(GEN), "workers")["pending"]  # nothing held
