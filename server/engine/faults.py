"""Fault injection for tests, off unless ``TOKSERVE_TEST_POISON_VALUE`` is set (never in production).

With it set, a tokenizer's decode raises :class:`PoisonedInput` when the tokens hold that exact value, so
tests can make one job of a batch fail in a real worker process (retries, dead-letter stream, isolation of
the other jobs of the batch) without a special model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class PoisonedInput(RuntimeError):
    """Raised by a poisoned decode (tests only)."""


def poison_decode(decode: Callable[[torch.Tensor], torch.Tensor],
                  value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``decode`` that raises on any batch whose tokens contain ``value``."""

    def poisoned(tokens: torch.Tensor) -> torch.Tensor:
        if bool((tokens == value).any()):
            raise PoisonedInput(f"tokens contain the test poison value {value}")
        return decode(tokens)

    return poisoned
