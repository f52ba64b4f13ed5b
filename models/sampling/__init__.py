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

Every family is registered once in :mod:`models.sampling.registry` (:func:`register_sampler`; the built-in
ones in :mod:`models.sampling.families`), which is what the server, training and tests consult.
Each exists as an official-recipe function over a whole batch and as a step sampler for the server's
scheduler (:mod:`models.sampling.base`), with the same numbers.

    >>> sampler = get_sampler("sde", model.config)
    >>> latents = run_to_completion(sampler, model, [SampleRequest(207, seed=0, steps=50, cfg_scale=1.75)],
    ...                             (model.config.num_tokens, model.config.token_dim))
"""

from __future__ import annotations

from typing import Any

from models.sampling import families as _families  # noqa: F401  (registers the built-in families)
from models.sampling.base import ModelFn, Row, SampleRequest, StepSampler, StepStats, run_to_completion
from models.sampling.diffusion import DiffusionSampler, create_diffusion, ddim_sampler, ddpm_sampler
from models.sampling.flow import FlowSampler, euler_maruyama_sampler, euler_sampler, score_from_velocity
from models.sampling.registry import (
    SamplerFamily,
    get_sampler,
    register_sampler,
    sampler_families,
    sampler_family,
    unregister_sampler,
)


def output_shape(config: Any) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) of one sample of a generator config (its :meth:`~models.surface.GeneratorConfigBase.
    sample_spec`): latents (L, D) float32 for SiT / DiT / MAR, codes (L,) int64 for MaskGIT, (G, L) int64 for
    VAR; ``shape`` is what :func:`run_to_completion` takes."""
    spec = config.sample_spec()
    return spec.shape, spec.dtype


__all__ = [
    "DiffusionSampler",
    "FlowSampler",
    "ModelFn",
    "Row",
    "SampleRequest",
    "SamplerFamily",
    "StepSampler",
    "StepStats",
    "create_diffusion",
    "ddim_sampler",
    "ddpm_sampler",
    "euler_maruyama_sampler",
    "euler_sampler",
    "get_sampler",
    "output_shape",
    "register_sampler",
    "run_to_completion",
    "sampler_families",
    "sampler_family",
    "score_from_velocity",
    "unregister_sampler",
]
