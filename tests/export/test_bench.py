"""The benchmark script runs every requested runtime and reports agreement with eager torch."""

from __future__ import annotations

from export.bench import BenchRow, format_table, main


def test_bench_prints_a_row_per_runtime_and_batch(capsys) -> None:
    assert main(["--models", "sit-tiny-64x32", "--runtimes", "torch,torchscript,onnx", "--batches", "1,2",
                 "--warmup", "1", "--repeats", "1", "--min-time", "0", "--threads", "1"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sit-tiny-64x32")]
    assert len(lines) == 3 * 2
    assert {ln.split()[3] for ln in lines} >= {"torch-eager", "torchscript", "onnx[CPU]"}
    for ln in lines:
        assert float(ln.split()[-1]) <= 1e-4  # max_rel vs eager torch


def test_format_table_markdown() -> None:
    rows = [BenchRow("m", "encoder", "onnx[CPU]", 32, 10.0, 1e-7)]
    table = format_table(rows, markdown=True).splitlines()
    assert table[0].startswith("| model") and table[2] == "| m | encode | onnx[CPU] | 32 | 10.00 | 3200.0 | 1.0e-07 |"
