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
    gen, enc = s["by_op"]["generate"], s["by_op"]["encode"]
    assert gen["errors"] == {"429": 1, "timeout": 1} and gen["error_rate"] == 1.0 and gen["latencies_ms"] == []
    assert enc["errors"] == {} and enc["error_rate"] == 0.0
    assert enc["latencies_ms"] == pytest.approx(sorted(lat * 1e3))
    assert enc["latency_ms"]["p99"] == pytest.approx(np.percentile(lat * 1e3, 99))
    assert enc["server_total_ms"]["mean"] == 4.0
    assert distribution([])["p50"] is None


def _mixed_summary(rates: tuple[float, ...] = (0.0,)) -> list[dict]:
    """Runs where encode answers in ~10-20 ms and generate in ~2-4 s (the real ratio is larger still)."""
    rng = np.random.default_rng(1)
    runs = []
    for rate in rates:
        recs = [RequestRecord("encode", 0.0, float(t), 200, 1) for t in rng.uniform(0.01, 0.02, 60)]
        recs += [RequestRecord("decode", 0.0, float(t), 200, 1) for t in rng.uniform(0.02, 0.04, 30)]
        recs += [RequestRecord("generate", 0.0, float(t), 200, 1) for t in rng.uniform(2.0, 4.0, 10)]
        label = {"mode": "open", "rate": rate} if rate else {"mode": "closed", "concurrency": 8}
        runs.append(summarise(recs, started=0.0, label=label))
    return runs


def test_plot_has_a_series_per_operation(tmp_path: Path) -> None:
    """The PNG shows each operation apart: percentile lines, a CDF and throughput bars per operation, with
    the plotted values being that operation's own statistics (not the merged run's)."""
    from tokserve._bench_plot import build_figure, plot_report

    runs = _mixed_summary()
    fig = build_figure(runs, p99_target_ms=1000.0)
    ax_tp, ax_cdf, ax_bar = fig.axes
    lines = {ln.get_label(): ln for ln in ax_tp.lines}
    for op in ("encode", "decode", "generate"):
        for key in ("p50", "p90", "p99"):
            x, y = lines[f"{op} {key}"].get_data()
            assert y[0] == pytest.approx(runs[0]["by_op"][op]["latency_ms"][key])
            assert x[0] == pytest.approx(runs[0]["by_op"][op]["throughput_rps"])
    assert ax_tp.get_yscale() == "log" and "p99 target 1000 ms" in lines
    cdfs = {ln.get_label().split(" ")[0]: ln for ln in ax_cdf.lines}
    assert set(cdfs) == {"encode", "decode", "generate"}
    assert max(cdfs["encode"].get_xdata()) < 25 < 2000 < min(cdfs["generate"].get_xdata())
    assert len(cdfs["decode"].get_xdata()) == 30
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in ax_bar.containers}
    assert bars["generate"] == [pytest.approx(runs[0]["by_op"]["generate"]["throughput_rps"])]
    assert sum(h[0] for h in bars.values()) == pytest.approx(runs[0]["throughput_rps"])

    sweep = _mixed_summary((20.0, 5.0, 10.0))  # plotted in offered-load order, one point per run
    ax_tp = build_figure(sweep).axes[0]
    x, _ = {ln.get_label(): ln for ln in ax_tp.lines}["generate p50"].get_data()
    by_rate = sorted(sweep, key=lambda s: s["rate"])
    assert list(x) == pytest.approx([s["by_op"]["generate"]["throughput_rps"] for s in by_rate])
    path = plot_report(sweep, tmp_path / "p.png", title="t")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1600, 500)


def test_table_lists_operations_under_each_run() -> None:
    from tokserve._bench_stats import format_table

    runs = _mixed_summary()
    plain = format_table(runs).splitlines()
    table = format_table(runs, by_op=True).splitlines()
    assert len(plain) == 3 and table[:3] == plain
    assert [ln.split()[0] for ln in table[3:]] == ["encode", "decode", "generate"]
    assert table[5].split()[1:3] == ["10", "10"]  # generate: 10 requests, 10 ok


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
            for op in run["by_op"].values():
                assert key in op
        assert sum(op["throughput_rps"] for op in run["by_op"].values()) == pytest.approx(run["throughput_rps"])
        assert sum(len(op["latencies_ms"]) for op in run["by_op"].values()) == run["ok"]
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
    op_rows = [ln.split()[0] for ln in out.stdout.splitlines() if ln.startswith("  ")]
    assert op_rows == ["encode", "generate"] * 2  # one row per operation under each of the two runs
    report = _check_outputs(tmp_path / "sw.json", tmp_path / "sw.png")
    assert report["sweep"]["best_rate"] == 20.0 and report["sweep"]["rates"] == [10.0, 20.0]
    assert report["url"] == fake_tokserve.url
    hosts = {r.headers.get("host") for r in fake_tokserve.requests}
    assert hosts == {fake_tokserve.url.removeprefix("http://")}  # only the given address is contacted
