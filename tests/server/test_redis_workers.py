"""Issue 8's recovery acceptance, end to end: a real redis-server (AOF), two real worker processes
(``python -m server.worker``) and the real API over HTTP. A poisoned input goes to the dead-letter stream
while its batch-mates succeed; a Redis outage answers fast 503s and loses no accepted job; a SIGKILLed
worker's jobs are reclaimed and each completes exactly once; a stopping worker hands its job back; /readyz
follows the workers' heartbeats."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from jobs_testkit import get, submit, wait_done
from poison_worker import POISON
from redis_testkit import (
    PREFIX,
    RedisServer,
    Worker,
    Workers,
    pending_of,
    stream,
    terminal_events,
    wait_for,
)
from server_testkit import ThreadServer

pytestmark = pytest.mark.redis
RECLAIM_S = 3.0
GEN = "generate:sit-tiny-64x32"


@dataclass
class Stack:
    redis: RedisServer
    workers: Workers
    api: ThreadServer

    @property
    def url(self) -> str:
        return self.api.url

    def worker(self, name: str) -> Worker:
        return [w for w in self.workers.all if w.name == name][-1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("stack")
    redis = RedisServer(folder / "redis").start()
    # the workers are poison_worker.py: their decode raises on tokens holding POISON (fault injection that
    # lives in the tests, not in the server's settings)
    workers = Workers(redis.url, folder, env={
        "TOKSERVE_REDIS_RECLAIM_S": str(RECLAIM_S), "TOKSERVE_MAX_WAIT_MS": "30", "TOKSERVE_SHUTDOWN_GRACE_S": "1"},
        program=[str(Path(__file__).with_name("poison_worker.py"))])
    for name in ("w-a", "w-b"):
        workers.start(name)
    try:
        workers.wait_announced(["w-a", "w-b"])
        with ThreadServer(REDIS_URL=redis.url, max_steps=20000, worker_heartbeat_s=0.5) as api:
            yield Stack(redis, workers, api)
    finally:
        workers.stop_all()
        redis.stop()


def _tokens(value: float = 0.1, poison: bool = False) -> dict[str, object]:
    t = np.full((1, 64, 32), value, dtype=np.float32)
    if poison:
        t[0, 5, 7] = POISON
    return {"shape": list(t.shape), "dtype": "float32", "data": t.ravel().tolist()}


def test_poisoned_input_goes_to_the_dead_letter_stream_and_its_batch_mates_succeed(stack: Stack) -> None:
    out: dict[str, httpx.Response] = {}

    def post(name: str, body: dict[str, object]) -> None:
        out[name] = httpx.post(f"{stack.url}/v1/decode", json=body, headers={"x-request-id": f"req-{name}"},
                               timeout=60)

    threads = [threading.Thread(target=post, args=(f"ok{i}", _tokens(0.01 * i))) for i in range(6)]
    threads.insert(3, threading.Thread(target=post, args=("poison", _tokens(poison=True))))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = out.pop("poison")
    assert bad.status_code == 500, bad.text
    err = bad.json()["error"]
    assert err["type"] == "model_error" and err["request_id"] == "req-poison" == bad.headers["x-request-id"]
    assert "dead-letter" in err["message"] and "poison" in err["message"]
    assert all(r.status_code == 200 and r.headers["content-type"] == "image/png" for r in out.values())
    r = stack.redis.client()
    (entry,) = [f for _, f in r.xrange(f"{PREFIX}:dead") if b"poison" in f[b"error"]]
    assert int(entry[b"deliveries"]) == 3 and entry[b"stream"] == stream("decode:softvq-tiny-64").encode()
    job = r.hgetall(f"{PREFIX}:job:{entry[b'id'].decode()}")
    assert job[b"status"] == b"failed" and job[b"request_id"] == b"req-poison" and job[b"deliveries"] == b"3"


def test_redis_outage_gives_fast_503s_and_loses_no_accepted_job(stack: Stack) -> None:
    url, r = stack.url, stack.redis.client()
    pids = {w.name: w.proc.pid for w in stack.workers.all if w.alive()}
    jobs_before = len(r.keys(f"{PREFIX}:job:*"))
    accepted = [submit(url, {"op": "generate", "class": 1, "seed": i, "steps": 1500})["id"] for i in range(3)]
    sync: dict[int, httpx.Response] = {}

    def call(i: int) -> None:
        sync[i] = httpx.post(f"{url}/v1/generate", json={"class": 2, "seed": i, "steps": 1500}, timeout=120)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(r.keys(f"{PREFIX}:job:*")) >= jobs_before + 6, 30, what="the sync jobs to be accepted")
    stack.redis.stop()
    gap_start = time.monotonic()
    answers = []
    while time.monotonic() - gap_start < 3.0:
        for method, path, body in (("POST", "/v1/generate", {"class": 3, "steps": 2}),
                                   ("POST", "/v1/jobs", {"op": "generate", "class": 3, "steps": 2}),
                                   ("GET", "/readyz", None)):
            t0 = time.monotonic()
            resp = httpx.request(method, f"{url}{path}", json=body, timeout=30)
            answers.append((resp.status_code, resp.headers.get("retry-after"), time.monotonic() - t0))
        time.sleep(0.1)
    stack.redis.start()
    slowest = max(a[2] for a in answers)
    print(f"\noutage: {len(answers)} requests during the gap, all 503 in <= {1e3 * slowest:.0f} ms")
    assert all(code == 503 and retry == "1" for code, retry, _ in answers), answers
    assert slowest < 1.0
    for t in threads:
        t.join(120)
    assert sorted(resp.status_code for resp in sync.values()) == [200, 200, 200], [s.text for s in sync.values()]
    for job_id in accepted:
        assert wait_done(url, job_id, 120)["status"] == "completed"
    wait_for(lambda: httpx.post(f"{url}/v1/generate", json={"class": 3, "steps": 2}, timeout=30).status_code == 200,
             20, step=0.2, what="service to resume")
    assert {w.name: w.proc.pid for w in stack.workers.all if w.alive()} == pids  # nothing restarted


def test_sigkilled_worker_jobs_complete_exactly_once(stack: Stack) -> None:
    url, r = stack.url, stack.redis.client()
    victim = stack.worker("w-a")
    n, ids, lock = 24, [], threading.Lock()

    def steady_load() -> None:
        for i in range(n):
            job_id = submit(url, {"op": "generate", "class": 4, "seed": i, "steps": 200})["id"]
            with lock:
                ids.append(job_id)
            time.sleep(0.08)

    loader = threading.Thread(target=steady_load)
    loader.start()
    wait_for(lambda: pending_of(r, stream(GEN), victim.name) >= 2, 30, what="the victim to hold a batch")
    held = sum(1 for entry, _ in r.xrange(stream(GEN)) if _owner(r, entry) == victim.name)
    victim.kill()
    killed_at = time.time()
    loader.join()
    stack.workers.start("w-a")  # back for the next tests (not needed by this one)
    done = {i: wait_done(url, i, 90) for i in ids}
    assert len(done) == n and all(d["status"] == "completed" for d in done.values())
    assert all(terminal_events(r, i) == ["completed"] for i in ids)  # each result written once
    reclaimed = [d for d in done.values() if d["deliveries"] >= 2]
    normal = [d["finished_at"] - d["submitted_at"] for d in done.values() if d["deliveries"] == 1]
    extra = [d["finished_at"] - d["submitted_at"] - statistics.median(normal) for d in reclaimed]
    print(f"\nSIGKILL: {n}/{n} jobs completed exactly once; {len(reclaimed)} reclaimed from the killed worker "
          f"(it held {held}), extra latency {min(extra):.1f}-{max(extra):.1f} s (reclaim timeout "
          f"{RECLAIM_S:.0f} s); median latency otherwise {statistics.median(normal):.2f} s")
    assert reclaimed and all(d["deliveries"] == 2 for d in reclaimed)
    retaken = [_started(r, d["id"])[1] - killed_at for d in reclaimed]  # when the survivor took each over
    print(f"reclaimed {min(retaken):.1f}-{max(retaken):.1f} s after the SIGKILL")
    assert max(retaken) < RECLAIM_S + 5.0


def _started(r, job_id: str) -> list[float]:  # type: ignore[no-untyped-def]
    """Times of the job's ``started`` events (one per delivery)."""
    return [json.loads(f[b"data"])["time"] for _, f in r.xrange(f"{PREFIX}:ev:{job_id}") if f[b"type"] == b"started"]


def _owner(r, entry_id: bytes) -> str | None:  # type: ignore[no-untyped-def]
    p = r.xpending_range(stream(GEN), "workers", min=entry_id, max=entry_id, count=1)
    return p[0]["consumer"].decode() if p else None


def test_stopping_worker_hands_its_job_back(stack: Stack) -> None:
    url, r = stack.url, stack.redis.client()
    stack.workers.wait_announced(["w-a", "w-b"])
    job_id = submit(url, {"op": "generate", "class": 5, "seed": 1, "steps": 20000})["id"]
    wait_for(lambda: (get(url, job_id)["progress"] or {}).get("step", 0) > 3, 30, what="the job to run")
    holder = stack.worker(r.hget(f"{PREFIX}:job:{job_id}", "worker").decode())
    other = "w-b" if holder.name == "w-a" else "w-a"
    t0 = time.monotonic()
    assert holder.stop(30) == 0  # SIGTERM: 1 s of grace, then the job is handed back
    exited = time.monotonic() - t0
    wait_for(lambda: r.hget(f"{PREFIX}:job:{job_id}", "worker") == other.encode()
             and get(url, job_id)["status"] == "running", 30, what="the other worker to take it over")
    moved = time.monotonic() - t0
    info = get(url, job_id)
    assert info["deliveries"] == 1  # handed back: not counted as a failed delivery
    events = [f for _, f in r.xrange(f"{PREFIX}:ev:{job_id}")]
    assert b"handed back" in b"".join(f[b"data"] for f in events if f[b"type"] == b"queued")
    print(f"\nhand-back: the stopping worker exited {exited:.1f} s after SIGTERM; the other worker ran the job "
          f"{moved:.1f} s after SIGTERM, on delivery 1 (handed back, not reclaimed)")
    # Handed back, the job is free the moment the holder exits; a reclaim would wait RECLAIM_S more. The
    # holder's own exit time depends on machine load, so measure from it.
    assert moved - exited < RECLAIM_S
    assert httpx.post(f"{url}/v1/jobs/{job_id}/cancel", timeout=30).json()["status"] == "cancelled"
    assert "handing the rest back" in holder.log()


def test_readyz_follows_worker_heartbeats(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/readyz", timeout=30).status_code == 200
    stack.workers.stop_all()
    wait_for(lambda: httpx.get(f"{stack.url}/readyz", timeout=30).status_code == 503, 10, what="503")
    body = httpx.get(f"{stack.url}/readyz", timeout=30).json()
    assert "no live worker serves" in body["error"]["message"]
