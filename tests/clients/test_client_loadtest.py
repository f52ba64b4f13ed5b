"""The load tester: mix parsing, arrivals, statistics, the rate search, and bounded runs over real HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from client_testkit import Reply, Request, ScriptedServer, fake_tokserve_routes
from PIL import Image
from tokserve import loadtest
from tokserve._bench_stats import RequestRecord, distribution, summarise
from tokserve.loadtest import BenchConfig, OpSpec


def test_opspec_parse() -> None:
    spec = OpSpec.parse(
        "generate:2.5:class_id=207,steps=8,cfg_scale=1.5,guidance_interval=0.1/0.9,sampler=heun"
    )
    assert spec.op == "generate" and spec.weight == 2.5
    assert spec.params == {
        "class_id": 207,
        "steps": 8,
        "cfg_scale": 1.5,
        "guidance_interval": (0.1, 0.9),
        "sampler": "heun",
    }
    assert OpSpec.parse("encode") == OpSpec("encode", 1.0, {})
    assert OpSpec.parse("decode::batch=4").params == {"batch": 4}
    for bad in ("resize", "encode:0", "encode:1:batch"):
        with pytest.raises(ValueError):
            OpSpec.parse(bad)


def test_config_must_be_bounded() -> None:
    with pytest.raises(ValueError, match="bound"):
        BenchConfig(url="http://x", requests=None, duration=None).validate()
    with pytest.raises(ValueError):
        BenchConfig(url="http://x", mode="chaos").validate()


def test_poisson_arrivals_rate_and_bounds() -> None:
    arr = loadtest.poisson_arrivals(50.0, count=5000, duration=None, seed=3)
    assert len(arr) == 5000 and np.all(np.diff(arr) > 0)
    assert 5000 / arr[-1] == pytest.approx(50.0, rel=0.05)
    gaps = np.diff(arr)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.1)  # exponential: CV = 1
    timed = loadtest.poisson_arrivals(20.0, count=None, duration=2.0, seed=3)
    assert max(timed) < 2.0 and 20 < len(timed) < 70
    assert loadtest.poisson_arrivals(20.0, count=None, duration=2.0, seed=3) == timed


def test_summary_statistics() -> None:
    rng = np.random.default_rng(0)
    lat = rng.uniform(0.01, 0.2, size=300)
    recs = [RequestRecord("encode", 0.0, float(t), 200, 2, 1.0, 3.0, 4.0) for t in lat]
    recs += [RequestRecord("generate", 0.0, 0.001, 429), RequestRecord("generate", 0.0, 0.5, "timeout")]
    s = summarise(recs, started=0.0, label={"mode": "closed", "concurrency": 4})
    assert s["requests"] == 302 and s["ok"] == 300 and s["errors"] == {"429": 1, "timeout": 1}
    assert s["latency_ms"]["p99"] == pytest.approx(np.percentile(lat * 1e3, 99))
    assert s["latency_ms"]["max"] == pytest.approx(lat.max() * 1e3)
    assert s["duration_s"] == pytest.approx(0.5)  # until the last answer, errors included
    assert s["throughput_rps"] == pytest.approx(600.0) and s["images_per_s"] == pytest.approx(1200.0)
    assert s["queue_ms"]["mean"] == 1.0 and s["compute_ms"]["p50"] == 3.0
    assert s["by_op"]["generate"]["ok"] == 0 and s["by_op"]["encode"]["requests"] == 300
    assert distribution([])["p50"] is None


def test_find_max_rate_doubles_then_bisects() -> None:
    capacity = 37.0  # synthetic server: p99 explodes past 37 req/s

    async def run_at(rate: float) -> dict:
        p99 = 50.0 if rate <= capacity else 5000.0
        return {"rate": rate, "ok": 10, "error_rate": 0.0, "latency_ms": {"p99": p99}}

    def ok(s: dict) -> bool:
        return loadtest.passes(s, 100.0, 0.01)

    best, points = asyncio.run(loadtest.find_max_rate(run_at, ok, start=5.0, factor=2.0, refine=3))
    assert [p["rate"] for p in points[:5]] == [5.0, 10.0, 20.0, 40.0, 30.0]
    assert best == 35.0 and best <= capacity
    assert [p["passed"] for p in points] == [True, True, True, False, True, True, False]
    best, points = asyncio.run(loadtest.find_max_rate(run_at, ok, start=1, rates=[10, 50, 20, 60]))
    assert best == 20 and [p["rate"] for p in points] == [10, 20, 50]  # ascending, stops at first failure
    best, _ = asyncio.run(loadtest.find_max_rate(run_at, ok, start=100.0, refine=0))
    assert best is None


def test_passes_requires_successes_and_low_errors() -> None:
    good = {"ok": 5, "error_rate": 0.0, "latency_ms": {"p99": 10.0}}
    assert loadtest.passes(good, 20, 0.01)
    assert not loadtest.passes({**good, "error_rate": 0.2}, 20, 0.01)
    assert not loadtest.passes({**good, "latency_ms": {"p99": 30.0}}, 20, 0.01)
    assert not loadtest.passes({"ok": 0, "error_rate": 1.0, "latency_ms": {"p99": None}}, 20, 0.01)


def _check_outputs(json_path: Path, png_path: Path) -> dict:
    report = json.loads(json_path.read_text())
    with Image.open(png_path) as im:
        assert im.format == "PNG" and im.size[0] > 500
    for run in report["runs"]:
        for key in ("throughput_rps", "images_per_s", "latency_ms", "queue_ms", "compute_ms", "errors"):
            assert key in run
    return report


def test_closed_loop_counts_every_request(fake_tokserve: ScriptedServer, tmp_path: Path) -> None:
    mix = [
        OpSpec("encode", 1, {"batch": 2}),
        OpSpec("decode", 1),
        OpSpec("generate", 2, {"class_id": 207, "num_images": 2}),
    ]
    cfg = BenchConfig(url=fake_tokserve.url, mode="closed", mix=mix, concurrency=4, requests=40, warmup=4)
    report = asyncio.run(loadtest.run_bench(cfg, log=lambda _: None))
    run = report["runs"][0]
    assert run["requests"] == 40 and run["ok"] == 40 and run["errors"] == {}
    assert sum(v["requests"] for v in run["by_op"].values()) == 40
    assert set(run["by_op"]) == {"encode", "decode", "generate"}
    assert run["images_per_s"] > run["throughput_rps"]  # encode batch 2 and generate 2 images count double
    assert run["queue_ms"]["mean"] == 1.5 and run["compute_ms"]["mean"] == 2.5  # read from the headers
    assert run["latency_ms"]["p50"] >= 5.0  # the fake server sleeps 5 ms per call
    # setup: models + one encode for the decode payload; then 4 warm-up + 40 measured requests.
    ops = [r for r in fake_tokserve.requests if r.path in ("/v1/encode", "/v1/decode", "/v1/generate")]
    assert len(ops) == 1 + 4 + 40
    json_path, png_path = loadtest.write_report(report, tmp_path / "r.json", tmp_path / "r.png")
    assert _check_outputs(json_path, png_path)["config"]["concurrency"] == 4
    assert "api_key" not in report["config"]


def test_open_loop_keeps_arrival_schedule_and_counts_errors(tmp_path: Path) -> None:
    server = ScriptedServer()
    fake_tokserve_routes(server)
    lock, counter = threading.Lock(), {"n": 0}

    def generate(req: Request) -> Reply:
        with lock:
            counter["n"] += 1
            n = counter["n"]
        if n % 4 == 0:
            return Reply(429, {"error": {"message": "full"}}, {"Retry-After": "1"})
        time.sleep(0.05)
        return Reply(200, {"seed": 1, "images": []})

    server.route("/v1/generate", generate)
    server.start()
    try:
        cfg = BenchConfig(
            url=server.url, mode="open", mix=[OpSpec("generate")], rate=40.0, requests=40, warmup=0
        )
        t0 = time.perf_counter()
        report = asyncio.run(loadtest.run_bench(cfg, log=lambda _: None))
        elapsed = time.perf_counter() - t0
    finally:
        server.stop()
    run = report["runs"][0]
    assert run["requests"] == 40 and run["errors"].get("429") == 10 and run["ok"] == 30
    # open loop: 40 arrivals at 40/s take about 1 s although each request takes 50 ms (not 40 x 50 ms serial)
    assert 0.5 < elapsed < 6.0
    assert run["mode"] == "open" and run["rate"] == 40.0


def test_bench_cli_sweep_writes_json_and_png(fake_tokserve: ScriptedServer, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "tokserve.cli", "bench", "--url", fake_tokserve.url, "--mode", "sweep",
        "--sweep-rates", "10,20", "--requests", "15", "--warmup", "2", "--mix", "encode:1", "--mix",
        "generate:1:class_id=1,num_images=1", "--p99-target-ms", "5000", "-o", str(tmp_path), "--name", "sw",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "highest rate with p99 <= 5000 ms: 20 req/s" in out.stdout
    report = _check_outputs(tmp_path / "sw.json", tmp_path / "sw.png")
    assert report["sweep"]["best_rate"] == 20.0 and report["sweep"]["rates"] == [10.0, 20.0]
    assert report["url"] == fake_tokserve.url
    hosts = {r.headers.get("host") for r in fake_tokserve.requests}
    assert hosts == {fake_tokserve.url.removeprefix("http://")}  # only the given address is contacted
