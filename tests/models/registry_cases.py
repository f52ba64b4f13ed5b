"""Test cases generated from the registries (as timm does): every named configuration, the small ones that a
test can build for real, and one small configuration per registered sampler family.

Sizes come from a weightless build on the meta device, so a configuration registered tomorrow is covered
without editing a list here.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from models.registry import create_model, get_config, list_models
from models.sampling import sampler_families
from models.surface import surface_of

SMALL_PARAMS = 6_000_000  # built for real (random weights) by the round-trip tests


@functools.cache
def param_count(name: str) -> int:
    with torch.device("meta"):
        model = create_model(name)
    return sum(p.numel() for p in model.parameters())


def all_configs() -> list[str]:
    return list_models()


def small_configs() -> list[str]:
    return [n for n in list_models() if param_count(n) <= SMALL_PARAMS]


def kind_of(name: str) -> str:
    return surface_of(get_config(name)).kind


def smallest_of_family(family: str) -> str:
    """The registered generator configuration of ``family`` with the fewest parameters."""
    names = [n for n in list_models() if kind_of(n) == "generator" and get_config(n).family == family]
    if not names:
        raise LookupError(f"no registered configuration of generator family {family!r}")
    return min(names, key=param_count)


def sampler_cases() -> list[tuple[str, str]]:
    """(configuration, sampler name) for every sampler of every registered family, on its smallest config."""
    return [(smallest_of_family(fam), name) for fam, entry in sorted(sampler_families().items())
            for name in entry.samplers]


def tokenizer_for(generator: str) -> str:
    """The registered tokenizer that decodes ``generator``'s samples: the one its config names, else the
    smallest whose token spec its sample spec fits."""
    cfg = get_config(generator)
    spec = cfg.sample_spec()
    if cfg.tokenizer in list_models() and kind_of(cfg.tokenizer) == "tokenizer":
        return cfg.tokenizer
    fits = [n for n in list_models() if kind_of(n) == "tokenizer"
            and spec.fits(surface_of(get_config(n)).token_spec) is None]  # type: ignore[arg-type]
    if not fits:
        raise LookupError(f"no registered tokenizer decodes {generator}'s {spec}")
    return min(fits, key=param_count)


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``name`` with seeded random weights, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name).to(dtype).eval()


def sampler_kwargs(name: str, model_input: str, needs_tokenizer: bool, dtype: torch.dtype) -> dict[str, Any]:
    """What a server passes a family's sampler builder: device and dtype for module families, the paired
    tokenizer when the family needs one."""
    kwargs: dict[str, Any] = {} if model_input == "model_fn" else {"device": "cpu", "dtype": dtype}
    if needs_tokenizer:
        kwargs["tokenizer"] = build(tokenizer_for(name), dtype=dtype)
    return kwargs
