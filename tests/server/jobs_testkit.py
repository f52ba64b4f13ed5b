"""Client helpers for the jobs API tests (both queue backends): submit, poll, read server-sent events."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

TERMINAL = ("completed", "failed", "cancelled")


def submit(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=30)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    return r.json()


def get(url: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_done(url: str, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        body = get(url, job_id)
        if body["status"] in TERMINAL:
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not done in {timeout} s: {get(url, job_id)}")


def wait_step(url: str, job_id: str, at_least: int, timeout: float = 30.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        body = get(url, job_id)
        if (body["progress"] or {}).get("step", 0) >= at_least or body["status"] in TERMINAL:
            return body
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not reach step {at_least}: {get(url, job_id)}")


def read_events(url: str, job_id: str, last_event_id: str | None = None, limit: int | None = None,
                timeout: float = 60.0) -> list[dict[str, Any]]:
    """Server-sent events of a job: ``[{"id", "event", "data"}]``, until the terminal event or ``limit``
    events (then the connection is closed: a client that goes away)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    out: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        event: dict[str, Any] = {}
        for line in r.iter_lines():
            if line.startswith(":") or line.startswith("retry:"):
                continue
            if line == "":
                if "event" in event:
                    out.append(event)
                    if event["event"] in TERMINAL or (limit is not None and len(out) >= limit):
                        return out
                event = {}
                continue
            name, _, value = line.partition(": ")
            event[name] = json.loads(value) if name == "data" else value
    return out


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` on ``url``/metrics whose labels include ``labels`` (0 if none)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        if sample != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def wait_metric(url: str, name: str, at_least: float, timeout: float = 60.0, **labels: str) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = metric(url, name, **labels)
        if value >= at_least:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{name}{labels} stayed below {at_least} for {timeout} s: {metric(url, name, **labels)}")


def check_hang_up_cancels(url: str, worker_url: str | None = None, max_extra_steps: int = 1) -> str:
    """Over real HTTP: ``POST /v1/generate`` (20,000 steps) on a raw socket, wait until its row runs (a few
    steps done), close the connection without reading the answer. Then the API counts the cancel in
    ``tokserve_cancelled_total{op="generate",reason="client_disconnect"}`` and a 499, the row leaves the
    running batch (``tokserve_generation_rows`` 0, ``tokserve_generation_rows_cancelled_total`` + 1, on the
    worker's metrics at ``worker_url`` in Redis mode) and at most ``max_extra_steps`` steps of it run after the
    cancel was counted. Returns a line reporting what was seen."""
    import socket

    w = worker_url or url
    cancelled = {"op": "generate", "reason": "client_disconnect"}
    c0 = metric(url, "tokserve_cancelled_total", **cancelled)
    r0 = metric(w, "tokserve_generation_rows_cancelled_total")
    s0 = metric(w, "tokserve_denoise_step_seconds_count")
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps({"class": 1, "seed": 1, "steps": 20000}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(data) + data)
        wait_metric(w, "tokserve_denoise_step_seconds_count", s0 + 5)
        assert metric(w, "tokserve_generation_rows") == 1
    wait_metric(url, "tokserve_cancelled_total", c0 + 1, **cancelled)
    at_cancel = metric(w, "tokserve_denoise_step_seconds_count")
    wait_metric(w, "tokserve_generation_rows_cancelled_total", r0 + 1)
    end = time.monotonic() + 30
    while metric(w, "tokserve_generation_rows") != 0:
        assert time.monotonic() < end, "the row did not leave the running batch"
        time.sleep(0.02)
    time.sleep(0.3)  # anything still stepping would show now
    final = metric(w, "tokserve_denoise_step_seconds_count")
    extra = final - at_cancel
    assert metric(url, "tokserve_requests_total", op="generate", status="499") >= 1
    assert metric(url, "tokserve_cancelled_total", **cancelled) == c0 + 1
    assert metric(w, "tokserve_generation_rows_cancelled_total") == r0 + 1
    assert 0 <= extra <= max_extra_steps, f"{extra} steps ran after the cancel was counted"
    return (f"hung up at step {int(at_cancel - s0)} of 20000 (about): {int(extra)} step(s) of it ran after the "
            f"cancel was counted, then its row left the batch")
