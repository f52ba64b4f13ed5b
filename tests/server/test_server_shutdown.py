"""Integration: graceful shutdown. SIGTERM while requests run and wait in the queue: every accepted request
finishes with 200, new connections are refused, the process exits cleanly."""

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
