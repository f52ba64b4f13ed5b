"""Integration: graceful shutdown of ``python -m server``. SIGTERM while requests run and wait in the queue:
accepted requests finish with 200 when the grace allows, else get a JSON 503 + Retry-After; requests that
arrive during the drain get the same 503; the process exits within the grace (+ 2 s), and only then are
new connections refused."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from server_testkit import start_server


def test_sigterm_finishes_accepted_work(tmp_path: Path) -> None:
    server = start_server(tmp_path, {"TOKSERVE_MAX_BATCH_SIZE": "2"})
    try:
        def generate(i: int) -> int:
            r = httpx.post(f"{server.url}/v1/generate", json={"class": i, "steps": 60, "seed": i}, timeout=120)
            return r.status_code

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(generate, i) for i in range(6)]  # 2 running, 4 queued
            deadline = time.time() + 30
            while time.time() < deadline:  # wait until all six are accepted
                text = httpx.get(f"{server.url}/metrics").text
                if 'tokserve_queue_depth{model="sit-tiny-64x32",op="generate"} 4.0' in text:
                    break
                time.sleep(0.05)
            server.proc.send_signal(signal.SIGTERM)
            statuses = [f.result(timeout=120) for f in futures]
        assert statuses == [200] * 6
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status is -SIGTERM
        assert server.proc.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.log()
        try:
            httpx.get(f"{server.url}/healthz", timeout=2)
            refused = False
        except httpx.HTTPError:
            refused = True
        assert refused
    finally:
        server.stop()


def test_sigterm_past_the_grace_answers_503_and_exits_within_it(tmp_path: Path) -> None:
    """Work that outlives SHUTDOWN_GRACE_S gets a JSON 503 + Retry-After (not uvicorn's plain 500); requests
    that arrive during the drain get the same 503 (the socket stays open); the process is gone within the
    grace + 2 s."""
    grace = 2.0
    server = start_server(tmp_path, {"TOKSERVE_MAX_BATCH_SIZE": "2", "TOKSERVE_SHUTDOWN_GRACE_S": str(grace)})
    try:
        def generate(i: int) -> httpx.Response:
            return httpx.post(f"{server.url}/v1/generate", json={"class": i, "steps": 1000, "seed": i}, timeout=120)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(generate, i) for i in range(6)]  # 2 running, 4 queued, all far from done
            deadline = time.time() + 30
            while time.time() < deadline:
                text = httpx.get(f"{server.url}/metrics").text
                if 'tokserve_queue_depth{model="sit-tiny-64x32",op="generate"} 4.0' in text:
                    break
                time.sleep(0.05)
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            during = httpx.post(f"{server.url}/v1/generate", json={"class": 1, "steps": 2}, timeout=10)
            ready = httpx.get(f"{server.url}/readyz", timeout=10)
            alive = httpx.get(f"{server.url}/healthz", timeout=10)
            answers = [f.result(timeout=60) for f in futures]
            server.proc.wait(30)
            took = time.monotonic() - t0
        assert during.status_code == 503 and during.json()["error"]["type"] == "shutting_down"
        assert during.headers["retry-after"] == "1"
        assert ready.status_code == 503 and alive.status_code == 200
        assert {r.status_code for r in answers} == {503}, [r.text[:100] for r in answers]
        for r in answers:
            assert r.headers["content-type"] == "application/json" and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "shutting_down"
        print(f"exited {took:.2f} s after SIGTERM (grace {grace} s)")
        assert took < grace + 2.0, f"exited {took:.1f} s after SIGTERM (grace {grace} s)"
        assert "Traceback" not in server.log() and "Exception in ASGI" not in server.log()
    finally:
        server.stop()
