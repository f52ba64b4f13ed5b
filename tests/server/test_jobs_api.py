"""The jobs API on the in-process backend (real HTTP, the real engine): 202 + id, results equal to the
synchronous routes', server-sent events with replay after Last-Event-ID, cancellation of a running
generation (it stops consuming steps and frees its rows), priority order, validation. The same API through
Redis and worker processes: test_redis_jobs.py."""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from jobs_testkit import check_hang_up_cancels, get, metric, read_events, submit, wait_done, wait_step
from PIL import Image
from server_testkit import ThreadServer, real_jpegs


@pytest.fixture(scope="module")
def srv() -> Iterator[ThreadServer]:
    with ThreadServer(max_steps=20000, max_wait_ms=2.0) as s:
        yield s


@pytest.fixture(scope="module")
def narrow() -> Iterator[ThreadServer]:
    """One generation row at a time: whoever holds it decides who waits."""
    with ThreadServer(max_steps=20000, max_batch_size=1) as s:
        yield s


def _png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_each_op_as_a_job_matches_the_synchronous_route(srv: ThreadServer) -> None:
    url = srv.url
    jpegs = [base64.b64encode(b).decode() for b, _ in real_jpegs(2)]
    enc = submit(url, {"op": "encode", "images": jpegs})
    assert enc["status"] in ("queued", "running", "completed") and enc["op"] == "encode"
    done = wait_done(url, enc["id"])
    sync = httpx.post(f"{url}/v1/encode", json={"images": jpegs}, timeout=30).json()
    assert done["status"] == "completed" and done["error"] is None
    assert done["result"]["shape"] == sync["shape"] == [2, 64, 32]
    np.testing.assert_allclose(done["result"]["data"], sync["data"], atol=1e-5)

    tokens = {"shape": sync["shape"], "dtype": "float32", "data": sync["data"]}
    dec = wait_done(url, submit(url, {"op": "decode", **tokens, "format": "png"})["id"])
    sync_dec = httpx.post(f"{url}/v1/decode", json=tokens, timeout=30).json()
    assert dec["result"]["format"] == "png" and len(dec["result"]["images"]) == 2
    for a, b in zip(dec["result"]["images"], sync_dec["images"], strict=True):
        assert np.abs(_png_pixels(a).astype(int) - _png_pixels(b).astype(int)).max() <= 1

    params = {"class": 207, "num_images": 2, "seed": 11, "steps": 4, "return_latents": True}
    gen = wait_done(url, submit(url, {"op": "generate", **params})["id"])
    sync_gen = httpx.post(f"{url}/v1/generate", json=params, timeout=30).json()
    assert gen["result"]["seed"] == 11 and [i["seed"] for i in gen["result"]["images"]] == [11, 12]
    np.testing.assert_allclose(gen["result"]["latents"]["data"], sync_gen["latents"]["data"], atol=1e-4)
    assert gen["progress"] == {"step": 4, "steps": 4}
    assert gen["started_at"] >= gen["submitted_at"] and gen["finished_at"] >= gen["started_at"]


def test_events_stream_and_replay_after_reconnect(srv: ThreadServer) -> None:
    url = srv.url
    job = submit(url, {"op": "generate", "class": 1, "seed": 3, "steps": 400})
    first = read_events(url, job["id"], limit=4)  # then the client goes away
    assert [e["event"] for e in first[:2]] == ["queued", "started"]
    wait_done(url, job["id"])
    rest = read_events(url, job["id"], last_event_id=first[-1]["id"])  # reconnect: what was missed
    everything = read_events(url, job["id"])
    assert [e["id"] for e in first + rest] == [e["id"] for e in everything]
    types = [e["event"] for e in everything]
    assert types[:2] == ["queued", "started"] and types[-1] == "completed"
    steps = [e["data"]["step"] for e in everything if e["event"] == "step"]
    assert steps == list(range(1, 401)) and all(e["data"]["steps"] == 400 for e in everything[2:-1])
    assert read_events(url, job["id"], last_event_id=everything[-1]["id"], timeout=5) == []  # ended: closes


def _steps_run(url: str) -> int:
    """Denoising steps the engine has run (all jobs): the step-time histogram's count."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = re.findall(r'tokserve_denoise_step_seconds_count\{[^}]*\} ([0-9.e+]+)', text)
    return int(sum(float(v) for v in found))


def test_cancel_stops_consuming_steps_and_frees_rows(narrow: ThreadServer) -> None:
    url = narrow.url
    before = _steps_run(url)
    long = submit(url, {"op": "generate", "class": 1, "seed": 1, "steps": 20000})
    wait_step(url, long["id"], 5)
    waiting = submit(url, {"op": "generate", "class": 2, "seed": 2, "steps": 3})
    time.sleep(0.2)
    assert get(url, waiting["id"])["status"] == "queued"  # the one row is taken
    r = httpx.post(f"{url}/v1/jobs/{long['id']}/cancel", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    at_cancel = r.json()["progress"]["step"]
    done = wait_done(url, waiting["id"], timeout=30)  # its row was freed
    assert done["status"] == "completed"
    time.sleep(0.3)
    extra = _steps_run(url) - before - 3 - at_cancel  # steps of the cancelled job run after its cancel
    final = get(url, long["id"])
    print(f"\ncancel at step {at_cancel} of 20000: {extra} more step(s) of it ran (the one in flight at most)")
    assert final["status"] == "cancelled" and 0 <= extra <= 1
    loop = next(lp for lp in narrow.state.engine.loops if lp.kind.startswith("generate"))
    assert loop.scheduler.running_rows == 0 and len(loop.scheduler) == 0
    assert "tokserve_generation_rows{model=\"sit-tiny-64x32\"} 0.0" in httpx.get(f"{url}/metrics").text
    again = httpx.post(f"{url}/v1/jobs/{long['id']}/cancel", timeout=30).json()
    assert again["status"] == "cancelled"
    assert metric(url, "tokserve_cancelled_total", op="generate", reason="api") == 1  # not the repeat
    events = read_events(url, long["id"])
    assert events[-1]["event"] == "cancelled" and events[-1]["data"]["step"] == at_cancel


def test_priority_orders_waiting_jobs(narrow: ThreadServer) -> None:
    url = narrow.url
    blocker = submit(url, {"op": "generate", "class": 1, "seed": 1, "steps": 20000})
    wait_step(url, blocker["id"], 2)
    ids = {p: submit(url, {"op": "generate", "class": 3, "seed": 5, "steps": 2, "priority": p})["id"]
           for p in (-5, 0, 5)}
    hdr = submit(url, {"op": "generate", "class": 3, "seed": 5, "steps": 2}, headers={"x-priority": "9"})["id"]
    httpx.post(f"{url}/v1/jobs/{blocker['id']}/cancel", timeout=30)
    started = {k: wait_done(url, i)["started_at"] for k, i in {**ids, 9: hdr}.items()}
    assert sorted(started, key=started.__getitem__) == [9, 5, 0, -5]


def test_deadline_fails_a_job_that_cannot_finish(narrow: ThreadServer) -> None:
    url = narrow.url
    job = submit(url, {"op": "generate", "class": 1, "seed": 1, "steps": 20000, "deadline_ms": 300})
    done = wait_done(url, job["id"])
    assert done["status"] == "failed" and done["error"]["type"] == "deadline_exceeded"


def test_idempotent_submission_returns_the_first_job(srv: ThreadServer) -> None:
    url = srv.url
    body = {"op": "generate", "class": 5, "steps": 3}
    ids: list[str] = []

    def post() -> None:
        ids.append(submit(url, body, headers={"Idempotency-Key": "job-key-1"})["id"])

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
    first = wait_done(url, ids[0])
    assert submit(url, body, headers={"Idempotency-Key": "job-key-1"})["id"] == ids[0]
    seed = first["result"]["seed"]
    r = httpx.post(f"{url}/v1/jobs", json={**body, "class": 6}, headers={"Idempotency-Key": "job-key-1"})
    assert r.status_code == 422 and "different request" in r.json()["error"]["message"]
    assert isinstance(seed, int)


def test_validation_and_unknown_jobs(srv: ThreadServer) -> None:
    url = srv.url
    cases = [({"class": 1}, "op must be one of"), ({"op": "resize"}, "op must be one of"),
             ({"op": "generate", "class": 1, "priority": 1000}, "priority must be in"),
             ({"op": "generate", "class": 1, "deadline_ms": -1}, "deadline_ms"),
             ({"op": "generate", "class": 1, "bogus": 1}, "bogus"),
             ({"op": "decode", "shape": [1, 2, 3], "data": [0] * 6}, "do not fit"),
             ({"op": "encode", "images": []}, "no image")]
    for body, why in cases:
        r = httpx.post(f"{url}/v1/jobs", json=body, timeout=30)
        assert r.status_code == 422 and why in r.json()["error"]["message"], (body, r.text)
    assert httpx.post(f"{url}/v1/jobs", content=b"[1]", headers={"content-type": "application/json"}).status_code == 400
    for method, path in (("GET", "/v1/jobs/nope"), ("GET", "/v1/jobs/nope/events"), ("POST", "/v1/jobs/nope/cancel")):
        r = httpx.request(method, f"{url}{path}", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    assert "/v1/jobs/{job_id}/events" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_client_hang_up_cancels_its_rows_within_a_step_and_is_counted(narrow: ThreadServer) -> None:
    print("\n" + check_hang_up_cancels(narrow.url, max_extra_steps=1))
    loop = next(lp for lp in narrow.state.engine.loops if lp.kind.startswith("generate"))
    assert loop.scheduler.running_rows == 0 and len(loop.scheduler) == 0
    r = httpx.post(f"{narrow.url}/v1/generate", json={"class": 1, "steps": 2}, timeout=60)  # the row is free
    assert r.status_code == 200
