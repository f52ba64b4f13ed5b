"""Registry of model classes and named configurations.

Every model class registers itself once with :func:`register_model_class`; every named configuration
(``softvq-l-64``, ``sit-xl-1-64x32``, ``softvq-tiny-64`` ...) is registered once with :func:`register_config`
and built with :func:`create_model`. Training, export, the server and the tests all build models through
this module, so a configuration is defined in exactly one place.

A model class must:

* have a class attribute ``config_class``: a dataclass whose fields are JSON-serialisable
  (it may provide ``from_official(dict) -> config`` to translate a published ``config.json``);
* be constructible as ``cls(config)`` and keep the config as ``self.config``;
* optionally define ``IGNORED_KEYS`` / ``OPTIONAL_KEYS``: tuples of ``fnmatch`` patterns of state-dict keys
  that a checkpoint may carry without the model having them, or lack without being incomplete.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch.nn as nn

_CLASSES: dict[str, type[nn.Module]] = {}
_NAMED: dict[str, tuple[str, Callable[[], Any], str]] = {}


def register_model_class(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make ``cls`` buildable from a ``config.json`` that names it."""
    if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
        raise TypeError(f"{cls.__name__} needs a dataclass `config_class`")
    _CLASSES[cls.__name__] = cls
    return cls


def model_class(name: str) -> type[nn.Module]:
    try:
        return _CLASSES[name]
    except KeyError:
        raise KeyError(f"unknown model class {name!r}; known: {sorted(_CLASSES)}") from None


def register_config(name: str, cls: type[nn.Module], factory: Callable[[], Any], description: str = "") -> None:
    """Register the named configuration ``name`` of model class ``cls``; ``factory()`` returns its config."""
    if name in _NAMED:
        raise ValueError(f"configuration {name!r} registered twice")
    _NAMED[name] = (cls.__name__, factory, description)


def unregister(name: str) -> None:
    """Forget the named configuration ``name``, and its class when no other configuration uses it (tests that
    register a toy family take it back with this)."""
    entry = _NAMED.pop(name, None)
    if entry is not None and all(c != entry[0] for c, _, _ in _NAMED.values()):
        _CLASSES.pop(entry[0], None)


def get_config(name: str, **overrides: Any) -> Any:
    """The config dataclass of a named configuration, with fields replaced by ``overrides``."""
    _ensure_loaded()
    try:
        _, factory, _ = _NAMED[name]
    except KeyError:
        raise KeyError(f"unknown configuration {name!r}; known: {sorted(_NAMED)}") from None
    cfg = factory()
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the named configuration with freshly initialised (random) weights."""
    _ensure_loaded()
    cfg = get_config(name, **overrides)
    return model_class(_NAMED[name][0])(cfg)


def list_models(kind: str | None = None) -> list[str]:
    """Names of the registered configurations, optionally only those whose class name contains ``kind``."""
    _ensure_loaded()
    return sorted(n for n, (c, _, _) in _NAMED.items() if kind is None or kind.lower() in c.lower())


def describe(name: str) -> str:
    _ensure_loaded()
    return _NAMED[name][2]


def config_to_dict(model: nn.Module) -> dict[str, Any]:
    """The ``config.json`` content of a model: its class name, a format version and its config fields."""
    cfg = model.config  # type: ignore[attr-defined]
    return {"class_name": type(model).__name__, "format_version": 1, **dataclasses.asdict(cfg)}


def config_from_dict(d: dict[str, Any]) -> tuple[type[nn.Module], Any]:
    """Rebuild (class, config) from a ``config.json`` written by :func:`config_to_dict`."""
    _ensure_loaded()
    d = dict(d)
    cls = model_class(d.pop("class_name"))
    d.pop("format_version", None)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"config.json for {cls.__name__} has unknown fields {unknown}")
    return cls, cls.config_class(**_tuples(d))


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    # JSON has no tuples; configs use tuples for immutability.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _ensure_loaded() -> None:
    # Importing the package registers every family; done lazily so `models.registry` alone stays light.
    import models  # noqa: F401


def class_for_config(config: Any) -> type[nn.Module]:
    """The registered model class whose ``config_class`` is ``type(config)``."""
    _ensure_loaded()
    for cls in _CLASSES.values():
        if type(config) is cls.config_class:  # type: ignore[attr-defined]
            return cls
    raise KeyError(f"no registered model class takes a {type(config).__name__}")
