"""The app factory and lifespan, in process: 503 while loading, after a failed load and while shutting down;
one metrics registry per app; nothing heavy at import or in create_app."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import server.engine.engine as engine_mod
from server.app import create_app
from server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
TINY = ["softvq-tiny-64", "sit-tiny-64x32"]


def _wait_ready(c: TestClient, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if c.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("not ready")


def test_503_while_loading_then_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real = engine_mod.build_runtimes

    def slow_build(*a, **kw):  # type: ignore[no-untyped-def]
        gate.wait(30)
        return real(*a, **kw)

    monkeypatch.setattr(engine_mod, "build_runtimes", slow_build)
    with TestClient(create_app(Settings(models=TINY, torch_threads=1))) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready" and r.headers["retry-after"] == "1"
        r = c.post("/v1/generate", json={"class": 1})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert "tokserve_ready 0.0" in c.get("/metrics").text
        gate.set()
        _wait_ready(c)
        assert c.post("/v1/generate", json={"class": 1, "steps": 2}).status_code == 200


def test_failed_load_answers_503_without_its_details(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Embedded without the command line (which exits, see test_server_hostile.py), a failed load leaves
    503; the reason (which may name files) goes to the log, never to unauthenticated callers."""
    def broken(*a, **kw):  # type: ignore[no-untyped-def]
        raise RuntimeError("weights are corrupt in /secret/path/model.safetensors")

    monkeypatch.setattr(engine_mod, "build_runtimes", broken)
    with TestClient(create_app(Settings(models=TINY))) as c:
        time.sleep(0.2)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
        assert "failed to load" in r.json()["error"]["message"] and "/secret" not in r.text
        assert c.get("/healthz").status_code == 200
    assert "weights are corrupt in /secret/path" in caplog.text


def test_503_once_shutdown_starts() -> None:
    app = create_app(Settings(models=TINY, torch_threads=1))
    with TestClient(app) as c:
        _wait_ready(c)
        app.state.tokserve.accepting = False
        r = c.post("/v1/generate", json={"class": 1})
        assert r.status_code == 503 and r.json()["error"]["type"] == "shutting_down" and "retry-after" in r.headers
        assert c.get("/readyz").status_code == 503


def test_apps_have_their_own_metrics() -> None:
    a, b = create_app(Settings(models=TINY)), create_app(Settings(models=TINY))
    assert a.state.tokserve.metrics.registry is not b.state.tokserve.metrics.registry


def test_create_app_rejects_bad_models_at_once() -> None:
    with pytest.raises(ValueError, match="neither a folder"):
        create_app(Settings(models=["no-such-model"]))


def test_import_has_no_side_effects() -> None:
    code = ("import server.app, server.cli, server.worker, server.bench, server.engine.engine; "
            "import torch; assert not torch.cuda.is_initialized(); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok" and "RANDOM WEIGHTS" not in r.stderr, r.stderr


def test_dit_generator_is_served_with_its_samplers() -> None:
    app = create_app(Settings(models=["softvq-tiny-64", "dit-tiny-64x32"], torch_threads=1))
    with TestClient(app) as c:
        _wait_ready(c)
        info = {m["name"]: m for m in c.get("/v1/models").json()["models"]}["dit-tiny-64x32"]
        assert info["family"] == "dit" and info["samplers"] == ["ddpm", "ddim"]
        for sampler in ("ddpm", "ddim"):
            r = c.post("/v1/generate", json={"class": 3, "steps": 3, "seed": 1, "sampler": sampler,
                                             "cfg_scale": 2.0, "return_latents": True})
            assert r.status_code == 200, r.text
            assert r.json()["latents"]["shape"] == [1, 64, 32]
        r = c.post("/v1/generate", json={"class": 3, "sampler": "sde"})
        assert r.status_code == 422 and "ddpm" in r.json()["error"]["message"]
