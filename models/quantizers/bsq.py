"""Binary spherical quantization (BSQ, Zhao et al. 2024): LFQ on the unit sphere.

``u = z / ||z||``, ``q = sign(u) / sqrt(D)``: every code has unit norm, so the quantization error is bounded
(``||u - q|| <= sqrt(2 - 2/sqrt(D))``) whatever D. The entropy loss uses the factorized per-bit form
by default (the BSQ paper's soft-quantization estimate), so D can be large.
"""

from __future__ import annotations

from models.quantizers.lfq import EntropyMode, LookupFreeQuantizer


class BinarySphericalQuantizer(LookupFreeQuantizer):
    """BSQ over the last axis: z (..., D) -> codes in ``{-1/sqrt(D), +1/sqrt(D)}^D``, indices (...) int64.

    Same indices, losses and usage as :class:`LookupFreeQuantizer` (``sphere=True``, ``code_scale=1``).
    """

    def __init__(
        self,
        dim: int,
        *,
        beta: float = 0.25,
        entropy_weight: float = 0.1,
        sample_weight: float = 1.0,
        batch_weight: float = 1.0,
        entropy_temperature: float = 0.01,
        entropy_mode: EntropyMode = "factorized",
        usage_decay: float = 0.99,
    ) -> None:
        super().__init__(
            dim,
            code_scale=1.0,
            beta=beta,
            entropy_weight=entropy_weight,
            sample_weight=sample_weight,
            batch_weight=batch_weight,
            entropy_temperature=entropy_temperature,
            entropy_mode=entropy_mode,
            sphere=True,
            usage_decay=usage_decay,
        )
