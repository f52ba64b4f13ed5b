"""Parity of an exported part against the PyTorch model.

Errors are measured on the whole output tensor:

* ``max_abs`` = max |exported - reference|
* ``max_rel`` = max_abs / max |reference|  (relative to the output's scale; an element-wise ratio is
  meaningless where the reference crosses zero)

A check passes when ``max_rel <= tolerance``; the default tolerance for fp32 is ``1e-4``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityResult:
    """One comparison: which part, which exported format/runtime, which inputs, and the errors."""

    part: str
    runtime: str
    inputs: str  # "random" or "real"
    batch: int
    max_abs: float
    max_rel: float
    ref_scale: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (f"{self.part:<13} {self.runtime:<12} {self.inputs:<6} B={self.batch:<3} max_abs={self.max_abs:.3e} "
                f"max_rel={self.max_rel:.3e} (tol {self.tolerance:.0e}) {verdict}")


class ParityError(AssertionError):
    """An export whose outputs differ from the PyTorch model by more than the tolerance."""

    def __init__(self, failures: Sequence[ParityResult]) -> None:
        super().__init__("parity failed:\n" + "\n".join(r.line() for r in failures))
        self.failures = list(failures)


def compare(part: str, runtime: str, inputs: str, out: torch.Tensor, ref: torch.Tensor,
            tolerance: float = DEFAULT_TOLERANCE) -> ParityResult:
    """Compare ``out`` with ``ref`` (same shape); see the module docstring for the measures."""
    if tuple(out.shape) != tuple(ref.shape):
        raise ParityError([ParityResult(part, runtime, inputs, int(ref.shape[0]), float("inf"), float("inf"),
                                        0.0, tolerance)])
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        max_abs = float("inf")
    else:
        max_abs = float((out64 - ref64).abs().max())
    scale = float(ref64.abs().max())
    return ParityResult(part, runtime, inputs, int(ref.shape[0]), max_abs, max_abs / max(scale, 1e-12), scale,
                        tolerance)


def check_parity(part: str, runtime: str, run: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor],
                 cases: Sequence[tuple[str, tuple[torch.Tensor, ...]]],
                 tolerance: float = DEFAULT_TOLERANCE) -> list[ParityResult]:
    """Run ``run`` and ``reference`` on each ``(label, inputs)`` case and compare."""
    results = []
    for label, args in cases:
        with torch.inference_mode():
            ref = reference(*args)
        results.append(compare(part, runtime, label, run(*args), ref, tolerance))
    return results


def raise_on_failure(results: Sequence[ParityResult]) -> None:
    failures = [r for r in results if not r.passed]
    if failures:
        raise ParityError(failures)
