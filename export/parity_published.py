"""``python -m export.parity_published``: export the published-size configurations with random weights and
check their parity (the slow acceptance check; several minutes and ~10 GB of memory on a CPU).

    python -m export.parity_published                       # softvq-bl-64, then sit-xl-64x32
    python -m export.parity_published --models softvq-bl-64 --formats onnx --out /tmp/exports --keep

The tokenizer, when listed, is exported first and its tokens of real images are kept (not the model) to
give the generator's denoiser real, noised latents.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from export.exporter import FORMATS, RealTokens, encode_real, export_model
from export.inputs import random_weights_model
from export.parity import DEFAULT_TOLERANCE, ParityError, ParityResult
from export.parts import model_kind

PUBLISHED = ("softvq-bl-64", "sit-xl-64x32")


def run(names: list[str], out: Path, formats: list[str], tolerance: float, seed: int = 0) -> list[ParityResult]:
    """Export each name into ``out/name`` and return every parity result; raises ParityError on failure."""
    results: list[ParityResult] = []
    real_tokens: RealTokens | None = None
    for name in names:
        t0 = time.perf_counter()
        model = random_weights_model(name, seed)
        n_params = sum(p.numel() for p in model.parameters())
        is_tokenizer = model_kind(model) == "tokenizer"
        if is_tokenizer and real_tokens is None:
            real_tokens = encode_real(model)
        try:  # raises ParityError, listing the failures; export.json holds every result
            meta = export_model(model, out / name, source=name, formats=formats, tolerance=tolerance,
                                tokenizer=None if is_tokenizer else real_tokens, seed=seed)
        finally:
            del model
            gc.collect()
        found = [ParityResult(**{k: v for k, v in r.items() if k != "passed"}) for r in meta.parity]
        files = sorted(p.name for p in (out / name).iterdir() if p.is_file())
        size = sum((out / name / f).stat().st_size for f in files) / 2**30
        print(f"{name}: {n_params / 1e6:.1f} M params, exported in {time.perf_counter() - t0:.0f} s, "
              f"{size:.2f} GiB: {', '.join(files)}")
        for r in found:
            print("  " + r.line())
        results += found
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.parity_published", description=__doc__)
    p.add_argument("--models", default=",".join(PUBLISHED))
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    p.add_argument("--out", type=Path, default=None, help="export folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the exported files")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = args.out or Path(tempfile.mkdtemp(prefix="tokserve-published-"))
    try:
        run([m for m in args.models.split(",") if m], out, [f for f in args.formats.split(",") if f],
            args.tolerance)
    except ParityError as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print("all parity checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
