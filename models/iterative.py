"""What the iterative class-conditional generators (MAR, MaskGIT) share in their configs: the guidance
schedules, the checks every such config makes, and the generator-agnostic names of
:class:`models.surface.GeneratorConfigBase` (``steps``, ``sampler``) over their own fields."""

from __future__ import annotations

CFG_SCHEDULES = ("linear", "constant")  # guidance scale over the iterations: ramped with revealed tokens, or fixed


class IterativeConfigMixin:
    """Mixed (first) into frozen :class:`~models.surface.GeneratorConfigBase` dataclasses with
    ``hidden_size``, ``num_heads``, ``num_tokens``, ``num_iter``, ``cfg_schedule`` and a ``family``."""

    hidden_size: int
    num_heads: int
    num_tokens: int
    num_iter: int
    cfg_schedule: str
    family: str

    def check_common(self) -> None:
        """Raise ValueError for the problems every iterative generator config can have (the shared fields'
        too: :meth:`models.surface.GeneratorConfigBase.check_base`)."""
        problems = self.check_base()  # type: ignore[attr-defined]
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            problems.append(f"cfg_schedule {self.cfg_schedule!r} is not one of {CFG_SCHEDULES}")
        if self.num_iter < 1 or self.num_tokens < 1:
            problems.append("num_iter and num_tokens must be positive")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def steps(self) -> int:
        """Generator-agnostic alias of ``num_iter`` (the server's ``steps``)."""
        return self.num_iter

    @property
    def sampler(self) -> str:
        """The one step sampler of the family (``models.sampling.get_sampler``)."""
        return self.family
