"""The sampler registry: one entry per generator family, consulted by everything that samples.

A family registers once with :func:`register_sampler`: the sampler names a request may choose, how to build
one, and what the sampler calls. Validation, warm-up, the server's runtime and ``/v1/models`` read this
entry and the generator's config (:class:`models.surface.GeneratorConfigBase`); none of them knows a family
by name, so a new family is served by registering it (see ``tests/server/test_server_toy_family.py``).

    >>> register_sampler("toy", samplers=("toy",), build=lambda name, config, **kw: ToySampler(config, **kw),
    ...                  model_input="module")
    >>> get_sampler("toy", toy_model.config, device="cpu", dtype=torch.float32)

The built-in families (SiT, DiT, MAR, MaskGIT, VAR) are registered in :mod:`models.sampling.families`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from models.sampling.base import StepSampler

# build(name, config, **kwargs) -> StepSampler; ``config`` may be None for families that allow it
SamplerBuilder = Callable[..., StepSampler]
ModelInput = Literal["model_fn", "module"]


@dataclass(frozen=True)
class SamplerFamily:
    """How one generator family samples.

    ``samplers``: the names a request may choose (the config's ``sampler`` is the default). ``build(name,
    config, **kwargs)`` returns a fresh :class:`~models.sampling.base.StepSampler`. ``model_input`` says what
    its ``step`` takes as the model: ``"model_fn"``, the exportable ``model_fn(x (N, L, C) float32, t (N,),
    y (N,) int64) -> (N, L, C_out)`` on the tensors' device (the sampler is built with ``device=``, where its
    rows live; any runtime backend plugs in), or ``"module"``, the network itself, whose methods the sampler
    calls on the module's device (it is then built with ``device=`` and ``dtype=``). ``needs_tokenizer``: built with ``tokenizer=`` as well (VAR's
    ``next_scale_input``). ``fixed_steps``: the config's step count is the only valid one (VAR runs its
    scales). ``config_optional``: ``build`` accepts ``config=None`` (family defaults). ``step_noun``: what a
    step is, for messages ("steps", "iterations", "scales").
    """

    family: str
    samplers: tuple[str, ...]
    build: SamplerBuilder
    model_input: ModelInput = "model_fn"
    needs_tokenizer: bool = False
    fixed_steps: bool = False
    config_optional: bool = False
    step_noun: str = "steps"

    def __post_init__(self) -> None:
        if not self.samplers:
            raise ValueError(f"family {self.family!r} registers no sampler name")
        if self.model_input not in ("model_fn", "module"):
            raise ValueError(f"model_input must be 'model_fn' or 'module', got {self.model_input!r}")

    def warmup_steps(self, default_steps: int) -> int:
        """Steps of the warm-up row: two, or all of them when a request may not change the count."""
        return default_steps if self.fixed_steps else min(2, default_steps)


_FAMILIES: dict[str, SamplerFamily] = {}


def register_sampler(family: str, *, samplers: tuple[str, ...], build: SamplerBuilder,
                     model_input: ModelInput = "model_fn", needs_tokenizer: bool = False,
                     fixed_steps: bool = False, config_optional: bool = False,
                     step_noun: str = "steps") -> SamplerFamily:
    """Register how generator ``family`` samples (fields: :class:`SamplerFamily`). Twice is an error."""
    if family in _FAMILIES:
        raise ValueError(f"sampler family {family!r} registered twice")
    entry = SamplerFamily(family, tuple(samplers), build, model_input, needs_tokenizer, fixed_steps,
                          config_optional, step_noun)
    _FAMILIES[family] = entry
    return entry


def unregister_sampler(family: str) -> None:
    """Forget a family (tests that register a toy one clean up with this)."""
    _FAMILIES.pop(family, None)


def sampler_family(family: str) -> SamplerFamily:
    """The registered entry of ``family``; ValueError naming the known ones otherwise."""
    _ensure_loaded()
    try:
        return _FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown generator family {family!r}; registered: {sorted(_FAMILIES)}") from None


def sampler_families() -> dict[str, SamplerFamily]:
    """Every registered family, by name."""
    _ensure_loaded()
    return dict(_FAMILIES)


def _family_and_config(model: Any) -> tuple[str, Any]:
    """(family, config or None) of a family name, a generator config or a module with ``.config``."""
    if isinstance(model, str):
        return model.lower(), None
    from models.surface import GeneratorConfigBase

    cfg = model if isinstance(model, GeneratorConfigBase) else getattr(model, "config", None)
    if not isinstance(cfg, GeneratorConfigBase):
        raise ValueError(f"cannot tell the generator family of {type(model).__name__}; pass a family name, a "
                         f"generator config or a generator module")
    return cfg.family, cfg


def get_sampler(name: str, model: Any = "sit", **kwargs: Any) -> StepSampler:
    """The step sampler ``name`` of a generator family.

    ``model`` is a family name, a generator config or a module with ``.config``; a config supplies the null
    class and the family's defaults (families without ``config_optional`` need it). ``kwargs`` go to the
    family's builder: model-function families take ``device`` (of the rows), ``null_class`` and their own
    options; module families ``device`` and ``dtype`` (of the module), plus ``tokenizer`` when they need it.
    """
    family, cfg = _family_and_config(model)
    entry = sampler_family(family)
    if name not in entry.samplers:
        raise ValueError(f"sampler {name!r} does not fit {family}; choose one of {entry.samplers}")
    if cfg is None and not entry.config_optional:
        raise ValueError(f"a {family} sampler needs the generator's config, not just the family name")
    if entry.needs_tokenizer and "tokenizer" not in kwargs:
        raise ValueError(f"a {family} sampler needs tokenizer= (the tokenizer it decodes with)")
    return entry.build(name, cfg, **kwargs)


def _ensure_loaded() -> None:
    # The built-in families register when the package is imported.
    import models.sampling  # noqa: F401
