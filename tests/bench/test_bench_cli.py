"""The benchmark commands run end to end on tiny models on the CPU and write their raw JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_generate_small_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "gen.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench.generate", "--device", "cpu", "--small", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["bench"] == "generate" and rec["env"]["torch"] and rec["env"]["date"] and rec["env"]["device"]
    assert "float32" in rec["peak"]["note"] and rec["peak"]["tflops"] > 0
    rows = rec["rows"]
    assert {(r["variant"], r["op"]) for r in rows} == {
        (v, op) for v in ("fp32", "bf16+graphs")
        for op in ("generate-sde", "generate-sde-step", "generate-ode-euler", "generate-ode-euler-step")}
    for r in rows:
        assert r["items_per_s"] > 0 and r["gflop_per_item"] > 0 and r["finite"]
        assert r["extra"]["model_rows_per_image"] == 17  # 10 steps, 7 of them guided on [0, 0.7]
        bound = 1e-6 if r["variant"] == "fp32" else 5e-2
        assert r["err_rel"] <= bound, r
    assert any("model rows per image" in n for n in rec["notes"])
    assert "issue 10 reference figures" in proc.stdout and "MFU@686" in proc.stdout


def test_tokenizer_denoiser_peak_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import denoiser, peak, plot, tokenizer

    fast = ["--device", "cpu", "--small", "--warmup", "0", "--repeats", "1"]
    assert tokenizer.main([*fast, "--out", str(tmp_path / "tok.json")]) == 0
    assert denoiser.main([*fast, "--out", str(tmp_path / "den.json")]) == 0
    assert peak.main(["--device", "cpu", "--small", "--out", str(tmp_path / "peak.json")]) == 0
    assert torch.is_grad_enabled()  # the commands restore the process state they change
    tok = json.loads((tmp_path / "tok.json").read_text())
    assert {(r["op"], r["variant"]) for r in tok["rows"]} == {
        (op, v) for op in ("encode", "decode") for v in ("fp32", "bf16-autocast", "bf16+graphs")}
    den = json.loads((tmp_path / "den.json").read_text())
    assert sorted({r["batch"] for r in den["rows"]}) == [1, 2, 4, 8]
    assert all(r["err_rel"] < (1e-6 if r["variant"] == "fp32" else 5e-2) for r in den["rows"])
    assert json.loads((tmp_path / "peak.json").read_text())["peak"]["dtype"] == "float32"
    png = tmp_path / "den.png"
    assert plot.main([str(tmp_path / "den.json"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "softvq-tiny-64" in text and "sit-tiny-64x32" in text
