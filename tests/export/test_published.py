"""Published-size configurations (softvq-bl-64, sit-xl-64x32) export with random weights and pass parity.

Slow (about 10 minutes and ~10 GB of memory on 2 CPU cores): ``pytest -m slow tests/export/test_published.py``
or ``python -m export.parity_published``.
"""

from __future__ import annotations

import pytest

from export.parity_published import PUBLISHED, run


@pytest.mark.slow
def test_published_sizes_pass_parity(tmp_path) -> None:
    results = run(list(PUBLISHED), tmp_path, ["onnx", "torchscript"], tolerance=1e-4)
    assert results and all(r.passed for r in results)
    seen = {(r.part, r.runtime, r.inputs) for r in results}
    for part in ("encoder", "decoder", "denoiser"):
        for fmt in ("onnx", "torchscript"):
            assert (part, fmt, "real") in seen and (part, fmt, "random") in seen
    assert (tmp_path / "sit-xl-64x32" / "denoiser.onnx.data").exists()  # over 2 GB: external weights
