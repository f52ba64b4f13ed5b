"""``python -m training.grids``: the README figures of the shipped default models (docs/reconstructions.png,
docs/samples.png). Kept as an entry point; the work is :func:`training.figures.write_figures`, also reachable
as ``python -m training figures`` with options."""

from __future__ import annotations

import torch

from training.figures import write_figures


def main(tokenizer: str = "weights/default/tokenizer", generator: str = "weights/default/generator") -> None:
    torch.set_num_threads(1)
    for path in write_figures(tokenizer, generator, "docs"):
        print(path)


if __name__ == "__main__":
    main()
