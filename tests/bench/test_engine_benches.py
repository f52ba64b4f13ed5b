"""bench.overhead and bench.gpu_plan on the CPU with tiny models: they drive the server's real engine (and,
for the GPU plan, the real HTTP server) and their figures are consistent with what ran."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_plan, overhead
from bench.engine_harness import EngineHarness

TOKENIZER = "softvq-tiny-64"
GENERATOR = "sit-tiny-64x32"


def test_harness_attributes_each_step_to_one_forward() -> None:
    """B one-image jobs step together: one progress report per step, one forward per SDE step of 2B
    model rows while guidance is on, and the measured steps are those between the first two and the last."""

    async def go() -> None:
        async with EngineHarness([TOKENIZER, GENERATOR], max_batch_size=8, torch_threads=1) as h:
            run = await h.generate(GENERATOR, 3, 7, cfg_scale=1.75, guidance=(0.0, 1.0))
            assert run.together
            assert len(run.periods_s) == 7 - 3 and len(run.forward_s) == 4
            assert run.model_rows == [6] * 4  # guided on every step: 3 conditional + 3 unconditional rows
            assert all(p >= f > 0 for p, f in zip(run.periods_s, run.forward_s, strict=True))
            unguided = await h.generate(GENERATOR, 3, 6, cfg_scale=1.0)
            assert unguided.model_rows == [3] * 3
            wall, tokens = await h.tokenize("encode", TOKENIZER, torch.zeros(2, 3, 64, 64))
            assert wall > 0 and [t.shape[0] for t in tokens] == [1, 1]

    asyncio.run(go())


def test_overhead_quick_writes_consistent_rows(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    threads = torch.get_num_threads()
    assert overhead.main(["--quick", "--tokenizer", TOKENIZER, "--batches", "1,4", "--tok-batches", "2",
                          "--threads", "1", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the engine's thread setting does not outlive the run
    rec = json.loads(out.read_text())
    gen = [r for r in rec["rows"] if r["part"] == "generate"]
    assert [(r["model"], r["batch"], r["model_rows"]) for r in gen] == [(GENERATOR, 1, 2), (GENERATOR, 4, 8)]
    for r in gen:
        assert r["steps_measured"] == 5 - 3
        assert r["step_ms"] > r["forward_in_loop_ms"] > 0 and r["bare_forward_ms"] > 0
        assert r["overhead_us"] == pytest.approx(1e3 * r["step_ms"] * r["overhead_fraction"])
        assert r["step_ms"] > r["sampler_step_ms"] > r["forward_in_loop_ms"]  # the scheduler times inside the loop
    assert sorted((r["part"], r["batch"]) for r in rec["rows"] if r["part"] != "generate") == [("decode", 2),
                                                                                             ("encode", 2)]
    assert rec["goal"]["checked"] and rec["goal"]["batch"] == 4
    assert len(rec["env"]["load_average"]) == 3


def test_gpu_plan_budget_skips_what_would_overrun() -> None:
    budget = gpu_plan.Budget(100.0)
    budget.part_end = time.monotonic() + 1.0
    assert gpu_plan.estimate(None, 256) == 0.0  # the first batch always runs
    assert gpu_plan.estimate((8, 0.5), 16) == 0.5  # launch-bound below 32 rows
    assert gpu_plan.estimate((64, 0.5), 128) == 1.0

    class Rec:
        rows: list[dict] = []

        def add(self, row: dict) -> None:
            self.rows.append(row)

    rec = Rec()
    async def run(b: int) -> dict:
        return {"seconds": 0.6}

    asyncio.run(gpu_plan._sweep("x", [1, 16, 64], budget, rec, run))  # type: ignore[arg-type]
    assert [("skipped" in r) for r in rec.rows] == [False, False, True]


def test_gpu_plan_small_runs_every_part_on_the_server_path(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    assert gpu_plan.main(["--small", "--device", "cpu", "--batches", "1,2", "--tok-batches", "2", "--budget-s", "400",
                          "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    assert torch.is_grad_enabled()  # left as it was
    rec = json.loads(out.read_text())
    assert not [k for k in rec["parts"] if k.endswith("error")], rec["parts"]
    assert rec["parts"]["http"]["ready"]
    done = {(r["part"], r["op"], r["batch"]) for r in rec["rows"] if "skipped" not in r}
    assert done == {("engine", "generate", 1), ("engine", "generate", 2), ("tokenizer", "encode", 2),
                    ("tokenizer", "decode", 2), ("http", "generate", 1), ("http", "generate", 2)}
    for r in rec["rows"]:
        assert r["img_per_s"] == pytest.approx(r["batch"] / r["seconds"])
        if r["part"] == "http":
            assert r["statuses"] == {"200": r["batch"]}
    assert (tmp_path / "work" / GENERATOR / "config.json").exists()
