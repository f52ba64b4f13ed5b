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
