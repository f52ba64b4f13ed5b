"""Fixtures for the client tests (helpers in ``client_testkit.py``, importable by its bare name)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from client_testkit import (  # noqa: E402
    LIVE_API_KEY,
    LIVE_MODELS,
    LiveProcess,
    ScriptedServer,
    compose_argv,
    fake_tokserve_routes,
    free_port,
    start_process,
    wait_ready,
)


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    """A scripted HTTP server on a free loopback port; routes are set by the test."""
    server = ScriptedServer().start()
    yield server
    server.stop()


@pytest.fixture
def fake_tokserve() -> Iterator[ScriptedServer]:
    """A scripted server answering like tokserve (fixed tensors, 5 ms per call)."""
    server = ScriptedServer()
    fake_tokserve_routes(server, latency=0.005)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProcess]:
    """The real tokserve server (the compose file's API command on a free loopback port, embedded worker).

    Small limits make every error reachable: a 4-job queue and 4-row batches (429 under a flood), a
    300 kB body limit (413), an API key (401).
    """
    port = free_port()
    env: dict[str, str | None] = {
        "REDIS_URL": None,
        "TOKSERVE_REDIS_URL": None,
        "TOKSERVE_MODELS": LIVE_MODELS,
        "TOKSERVE_DEVICE": "cpu",
        "TOKSERVE_QUEUE_CAPACITY": "4",
        "TOKSERVE_MAX_BATCH_SIZE": "4",
        "TOKSERVE_MAX_BODY_BYTES": "300000",
        "TOKSERVE_API_KEYS": LIVE_API_KEY,
        "TOKSERVE_RETRY_AFTER_S": "1",
        "TOKSERVE_TORCH_THREADS": "2",
    }
    argv = compose_argv("api", host="127.0.0.1", port=str(port))
    log = tmp_path_factory.mktemp("live") / "server.log"
    live = start_process(argv, env, log, f"http://127.0.0.1:{port}")
    wait_ready(live)
    yield live
    live.stop()
