"""Recognise a published ``config.json`` (no ``class_name``) and translate it into one of our configs.

Each family's config class provides ``matches_official(d) -> bool`` and ``from_official(d) -> config``;
this module only dispatches, so a new family adds itself by listing its model class in ``FAMILIES``.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from models.registry import model_class

# Checked in order; the first whose config class recognises the dict wins.
FAMILIES = ("SoftVQModel", "ImageFolderModel", "DiT", "SiT")


def config_from_official(d: dict[str, Any]) -> tuple[type[nn.Module], Any]:
    for name in FAMILIES:
        try:
            cls = model_class(name)
        except KeyError:
            continue
        cfg_cls = cls.config_class
        if hasattr(cfg_cls, "matches_official") and cfg_cls.matches_official(d):
            return cls, cfg_cls.from_official(d)
    raise ValueError(f"config.json not recognised (no class_name, keys {sorted(d)[:12]}...)")
