"""Fault injection for tests: ``python tests/server/poison_worker.py [worker flags]`` is ``python -m
server.worker`` whose tokenizers' decode raises :class:`PoisonedInput` on any batch whose tokens hold the exact
value :data:`POISON`.

It lets a test make one job of a batch fail in a real worker process (retries, the dead-letter stream, the
isolation of the job's batch-mates) without a special model, and without anything test-only in the server:
the engine's ``build_runtimes`` is wrapped here, in the test process tree only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

POISON = 1234.5  # the token value that makes a decode raise


class PoisonedInput(RuntimeError):
    """Raised by a poisoned decode."""


def poison_decode(decode: Callable[[torch.Tensor], torch.Tensor],
                  value: float = POISON) -> Callable[[torch.Tensor], torch.Tensor]:
    """``decode`` ((B, L, D) tokens -> (B, 3, H, W) images) that raises on any batch holding ``value``."""

    def poisoned(tokens: torch.Tensor) -> torch.Tensor:
        if bool((tokens == value).any()):
            raise PoisonedInput(f"tokens contain the test poison value {value}")
        return decode(tokens)

    return poisoned


def install(value: float = POISON) -> None:
    """From now on, the engine builds tokenizer runtimes whose ``decode`` is :func:`poison_decode`."""
    from server.engine import engine
    from server.engine.runtime import TokenizerRuntime

    build = engine.build_runtimes

    def build_poisoned(*args: object, **kwargs: object) -> dict[str, object]:
        runtimes = build(*args, **kwargs)
        for rt in runtimes.values():
            if isinstance(rt, TokenizerRuntime):
                rt.decode = poison_decode(rt.decode, value)  # type: ignore[method-assign]
        return runtimes

    engine.build_runtimes = build_poisoned  # type: ignore[assignment]


if __name__ == "__main__":
    from server.worker import main

    install()
    raise SystemExit(main(sys.argv[1:]))
