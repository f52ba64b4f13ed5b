"""The built-in generator families, each registered once with its step sampler (:mod:`models.sampling.registry`).

* ``sit``: flow matching (:class:`~models.sampling.flow.FlowSampler`: ``euler``, ``heun``, ``sde``), over
  ``model_fn``;
* ``dit``: Gaussian diffusion (:class:`~models.sampling.diffusion.DiffusionSampler`: ``ddpm``, ``ddim``), over
  ``model_fn``;
* ``mar``: masked autoregression with a per-token diffusion head (``backbone`` / ``head`` of the module);
* ``maskgit``: confidence-based iterative decoding of codes (the module's ``__call__``);
* ``var``: next-scale prediction (``forward_scale``), with the tokenizer's ``next_scale_input``.

The module families' sampler modules are imported when a sampler is built, so that importing
:mod:`models.sampling` never imports a network module (they import this package's shared helpers).
"""

from __future__ import annotations

from typing import Any

import torch

from models.sampling.base import StepSampler
from models.sampling.diffusion import DIFFUSION_SAMPLERS, DiffusionSampler
from models.sampling.flow import FLOW_SAMPLERS, FlowSampler
from models.sampling.registry import register_sampler


def _flow(name: str, config: Any, **kwargs: Any) -> StepSampler:
    if config is not None:
        kwargs.setdefault("null_class", config.null_class)
    return FlowSampler(name, **kwargs)


def _diffusion(name: str, config: Any, **kwargs: Any) -> StepSampler:
    if config is not None:
        kwargs.setdefault("null_class", config.null_class)
        kwargs.setdefault("noise_schedule", config.noise_schedule)
    return DiffusionSampler(name, **kwargs)


def _mar(name: str, config: Any, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
         ) -> StepSampler:
    from models.sampling.mar import MARSampler

    return MARSampler.from_config(config, device=device, dtype=dtype)


def _maskgit(name: str, config: Any, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> StepSampler:
    # dtype is unused: MaskGIT feeds the module integer codes and reads float logits as they come.
    from models.sampling.maskgit import MaskGITSampler

    return MaskGITSampler.from_config(config, device=device)


def _var(name: str, config: Any, *, tokenizer: Any, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> StepSampler:
    from models.sampling.var import VARSampler

    return VARSampler.from_config(config, tokenizer=tokenizer, device=device, dtype=dtype)


register_sampler("sit", samplers=FLOW_SAMPLERS, build=_flow, config_optional=True)
register_sampler("dit", samplers=DIFFUSION_SAMPLERS, build=_diffusion, config_optional=True)
register_sampler("mar", samplers=("mar",), build=_mar, model_input="module", step_noun="iterations")
register_sampler("maskgit", samplers=("maskgit",), build=_maskgit, model_input="module", step_noun="iterations")
register_sampler("var", samplers=("var",), build=_var, model_input="module", needs_tokenizer=True,
                 fixed_steps=True, step_noun="scales")
