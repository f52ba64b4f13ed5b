"""What the iterative class-conditional generators (MAR, MaskGIT) share in their configs: the guidance
schedules, the checks every such config makes, and the generator-agnostic names the server reads
(``null_class``, ``steps``, ``sampler``)."""

from __future__ import annotations

CFG_SCHEDULES = ("linear", "constant")  # guidance scale over the iterations: ramped with revealed tokens, or fixed


class IterativeConfigMixin:
    """Mixed into frozen config dataclasses with ``hidden_size``, ``num_heads``, ``num_tokens``,
    ``num_classes``, ``trained_classes``, ``num_iter``, ``cfg_schedule`` and a ``family`` class variable."""

    hidden_size: int
    num_heads: int
    num_tokens: int
    num_classes: int
    trained_classes: tuple[int, ...]
    num_iter: int
    cfg_schedule: str
    family: str

    def check_common(self) -> None:
        """Raise ValueError for the problems every iterative generator config can have."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule {self.cfg_schedule!r} is not one of {CFG_SCHEDULES}")
        if self.num_iter < 1 or self.num_tokens < 1:
            raise ValueError("num_iter and num_tokens must be positive")
        if any(not 0 <= c < self.num_classes for c in self.trained_classes):
            raise ValueError(f"trained_classes must lie in [0, {self.num_classes})")

    @property
    def null_class(self) -> int:
        """The label of the unconditional embedding (one past the classes)."""
        return self.num_classes

    @property
    def steps(self) -> int:
        """Generator-agnostic alias of ``num_iter`` (the server's ``steps``)."""
        return self.num_iter

    @property
    def sampler(self) -> str:
        """The one step sampler of the family (``models.sampling.get_sampler``)."""
        return self.family
