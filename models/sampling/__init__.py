"""Samplers for the token generators, kept apart from the networks: they take the model as a callable
``model_fn(x (N, L, C) float32, t (N,) float32, y (N,) int64) -> (N, L, C_out)``.

* SiT (flow matching, t = 1 noise -> 0 data): ``euler``, ``heun`` (ODE) and ``sde`` (Euler-Maruyama,
  ``linear`` or ``cosine`` path) in :mod:`models.sampling.flow`;
* DiT (Gaussian diffusion, 1000 training steps, respaced): ``ddpm`` and ``ddim`` in
  :mod:`models.sampling.diffusion`;
* MAR (masked autoregression, per-token diffusion head): ``mar`` in :mod:`models.sampling.mar` (the model
  is the module itself: ``backbone`` / ``head``);
* MaskGIT (confidence-based iterative decoding of discrete codes): ``maskgit`` in
  :mod:`models.sampling.maskgit` (the model: ``model(codes, labels) -> logits``);
* VAR (next-scale prediction): ``var`` in :mod:`models.sampling.var` (the model: ``forward_scale``; the
  sampler also needs the tokenizer, for ``next_scale_input``).

Each exists as an official-recipe function over a whole batch and as a step sampler for the server's
scheduler (:mod:`models.sampling.base`), with the same numbers.

    >>> sampler = get_sampler("sde", model.config)
    >>> latents = run_to_completion(sampler, model, [SampleRequest(207, seed=0, steps=50, cfg_scale=1.75)],
    ...                             (model.config.num_tokens, model.config.token_dim))
"""

from __future__ import annotations

from typing import Any

from models.sampling.base import ModelFn, Row, SampleRequest, StepSampler, StepStats, run_to_completion
from models.sampling.diffusion import DiffusionSampler, create_diffusion, ddim_sampler, ddpm_sampler
from models.sampling.flow import FlowSampler, euler_maruyama_sampler, euler_sampler, score_from_velocity

FAMILY_SAMPLERS = {"sit": ("euler", "heun", "sde"), "dit": ("ddpm", "ddim"), "mar": ("mar",), "maskgit": ("maskgit",),
                   "var": ("var",)}
# families whose samplers call the model as ``model_fn(x, t, y)``; the others take the module itself
DENOISER_FAMILIES = ("sit", "dit")


# families whose samples are integer codes, turned into images by the tokenizer's ``decode_codes``
CODE_FAMILIES = ("maskgit", "var")


def output_shape(config: Any) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) of one sample of a generator config: latents (L, D) float32 for SiT / DiT / MAR,
    codes (L,) int64 for MaskGIT and (G, L) int64 (branches x pyramid positions) for VAR; ``shape`` is what
    :func:`run_to_completion` takes."""
    family = getattr(config, "family", "")
    if family == "maskgit":
        return (config.num_tokens,), "int64"
    if family == "var":
        return (config.num_branches, config.num_tokens), "int64"
    return (config.num_tokens, config.token_dim), "float32"


def _family_and_config(model: Any) -> tuple[str, Any]:
    if isinstance(model, str):
        return model.lower(), None
    cfg = getattr(model, "config", model)
    family = getattr(cfg, "family", "")
    if family not in FAMILY_SAMPLERS:
        raise ValueError(f"cannot tell the generator family of {type(model).__name__}; pass one of "
                         f"{sorted(FAMILY_SAMPLERS)}")
    return family, cfg


def get_sampler(name: str, model: Any = "sit", **kwargs: Any) -> StepSampler:
    """The step sampler ``name`` for a generator family.

    ``model`` is a family name (``"sit"``, ``"dit"``, ``"mar"``, ``"maskgit"``, ``"var"``), a generator config
    or a model with ``.config``; a config supplies the null class and the family's defaults (DiT: the noise
    schedule; MAR / MaskGIT / VAR: every sampling default, so for them a config is required). ``kwargs`` go
    to the sampler: :class:`FlowSampler` takes ``device``, ``null_class``, ``model_dtype``;
    :class:`DiffusionSampler` ``device``, ``null_class``, ``noise_schedule``; MAR ``device``, ``dtype``;
    MaskGIT ``device``; VAR ``tokenizer`` (required), ``device``, ``dtype``.
    """
    family, cfg = _family_and_config(model)
    if family not in FAMILY_SAMPLERS:
        raise ValueError(f"unknown generator family {family!r}; expected one of {sorted(FAMILY_SAMPLERS)}")
    if name not in FAMILY_SAMPLERS[family]:
        raise ValueError(f"sampler {name!r} does not fit {family}; choose one of {FAMILY_SAMPLERS[family]}")
    if family not in DENOISER_FAMILIES:
        if cfg is None:
            raise ValueError(f"a {family} sampler needs the generator's config, not just the family name")
        if family == "mar":
            from models.sampling.mar import MARSampler

            return MARSampler.from_config(cfg, **kwargs)
        if family == "maskgit":
            from models.sampling.maskgit import MaskGITSampler

            return MaskGITSampler.from_config(cfg, **kwargs)
        from models.sampling.var import VARSampler

        if "tokenizer" not in kwargs:
            raise ValueError("a VAR sampler needs tokenizer= (the multi-scale tokenizer, for next_scale_input)")
        return VARSampler.from_config(cfg, **kwargs)
    if cfg is not None:
        kwargs.setdefault("null_class", cfg.num_classes)
        if family == "dit":
            kwargs.setdefault("noise_schedule", cfg.noise_schedule)
    if family == "sit":
        return FlowSampler(name, **kwargs)
    return DiffusionSampler(name, **kwargs)


__all__ = [
    "DENOISER_FAMILIES",
    "FAMILY_SAMPLERS",
    "DiffusionSampler",
    "FlowSampler",
    "ModelFn",
    "Row",
    "SampleRequest",
    "StepSampler",
    "StepStats",
    "create_diffusion",
    "ddim_sampler",
    "ddpm_sampler",
    "euler_maruyama_sampler",
    "euler_sampler",
    "get_sampler",
    "run_to_completion",
    "score_from_velocity",
]
