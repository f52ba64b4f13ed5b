"""``python -m export``: export a model's parts and check their parity (see ``export/README.md``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch.nn as nn

from export.exporter import FORMATS, export_model
from export.formats import DEFAULT_OPSET, EXPORTERS
from export.inputs import random_weights_model
from export.parity import DEFAULT_TOLERANCE, ParityError, ParityResult
from export.parts import ALL_PARTS


def load_source(name_or_dir: str, seed: int) -> tuple[nn.Module, bool]:
    """(model, is_random): a checkpoint folder's model, or a registry name built with seeded random weights
    (constant layers redrawn, see :func:`~export.inputs.enliven_`): the weights the server gives that name."""
    import models

    if (Path(name_or_dir) / "config.json").exists():
        return models.load_pretrained(name_or_dir), False
    if name_or_dir not in models.list_models():
        raise SystemExit(f"{name_or_dir}: neither a checkpoint folder nor a registered configuration "
                         f"({', '.join(models.list_models())})")
    return random_weights_model(name_or_dir, seed), True


def _csv(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {allowed}")
    return items


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("--model", required=True, help="registry name (random weights) or checkpoint folder")
    p.add_argument("--out", required=True, type=Path, help="export folder to write")
    p.add_argument("--formats", default=",".join(FORMATS), type=lambda v: _csv(v, FORMATS, "formats"))
    p.add_argument("--parts", default=None, type=lambda v: _csv(v, ALL_PARTS, "parts"),
                   help="default: encoder,decoder for a tokenizer, denoiser for a generator")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="ONNX exporter: dynamo needs onnxscript; auto = dynamo if installed, else legacy")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="max relative error (fp32: 1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check")
    p.add_argument("--no-real", action="store_true", help="parity on random inputs only")
    p.add_argument("--tokenizer", default=None, help="tokenizer (name or folder) for real denoiser inputs")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and parity inputs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model, is_random = load_source(args.model, args.seed)
    tokenizer = load_source(args.tokenizer, args.seed)[0] if args.tokenizer else None
    try:
        meta = export_model(model, args.out, source=str(args.model), formats=args.formats, parts=args.parts,
                            opset=args.opset, exporter=args.exporter, check=not args.no_check,
                            tolerance=args.tolerance, real=not args.no_real, tokenizer=tokenizer,
                            save_model=is_random, seed=args.seed)
    except ParityError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"exported {args.model} ({meta.kind}) to {args.out}: "
          + ", ".join(f"{part}[{'/'.join(f)}]" for part, f in meta.files.items()))
    for r in meta.parity:
        print(ParityResult(**{k: v for k, v in r.items() if k != "passed"}).line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
