"""``python -m training.grids``: the README figures of the shipped default models (docs/reconstructions.png,
docs/samples.png). Kept as an entry point; the work is :func:`training.figures.write_figures`, also reachable
as ``python -m training figures`` with options."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.grids", description=__doc__)
    ap.add_argument("--tokenizer", default="weights/default/tokenizer")
    ap.add_argument("--generator", default="weights/default/generator")
    ap.add_argument("--out", default="docs", help="folder of the two PNGs (default %(default)s: overwrites them)")
    args = ap.parse_args(argv)  # --help prints this and exits before anything is written
    import torch

    from training.figures import write_figures

    torch.set_num_threads(1)
    for path in write_figures(args.tokenizer, args.generator, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
