"""Random weights that exercise a model: for serving registry names, exports and benchmarks.

Training-time initialisations leave some tensors constant (adaLN-Zero modulations and output layers at 0,
LayerScale at 1e-5), so a freshly built SiT/DiT outputs exactly 0 and a fresh tokenizer barely depends on its
image. Tests, parity checks and benchmarks on such weights would compare (or time) near-constant functions.
"""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def enliven(module: nn.Module, std: float = 0.1, generator: torch.Generator | None = None) -> nn.Module:
    """Redraw, in place, every constant floating parameter (more than one element, all equal, not all ones:
    norm scales stay) from N(0, std^2): from ``generator`` when given, else from the global RNG."""
    for p in module.parameters():
        if p.is_floating_point() and p.numel() > 1 and bool((p == p.flatten()[0]).all()) \
                and float(p.flatten()[0]) != 1.0:
            if generator is None:
                p.normal_(0.0, std)
            else:
                p.copy_(torch.randn(p.shape, generator=generator).to(p) * std)
    return module
