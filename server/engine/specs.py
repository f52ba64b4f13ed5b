"""What is served: a :class:`ModelSpec` per model, read from configurations only (no weights), and the
:class:`ModelSet` the API validates requests against. Weights are loaded by the worker (``runtime.py``).

A model entry of ``TOKSERVE_MODELS`` is a registry name (random weights, deterministic seed), a folder with
``config.json`` + safetensors, or ``name=folder``. A folder's default name is its base name, or
``<parent>-<base>`` for the generic ``tokenizer`` / ``generator`` folders (``weights/default/tokenizer`` is
``default-tokenizer``). A generator is paired with the tokenizer its config names, else with the only loaded
tokenizer whose token shape matches.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from models.sampling import FAMILY_SAMPLERS
from server.errors import NotFound

log = logging.getLogger("tokserve.models")

GENERIC_FOLDER_NAMES = ("tokenizer", "generator", "model")


@dataclass(frozen=True)
class ModelSpec:
    """One served model. ``token_shape`` is (L, D) of one image's tokens. Generators also carry the paired
    ``tokenizer``, the served ``classes``, the null class (``num_classes``) and sampling ``defaults``."""

    name: str
    kind: Literal["tokenizer", "generator"]
    family: str
    source: str  # folder path, or "registry:<name>"
    random_weights: bool
    config: Any
    image_size: int
    token_shape: tuple[int, int]
    tokenizer: str | None = None
    classes: tuple[int, ...] = ()
    num_classes: int | None = None
    samplers: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def registry_name(self) -> str | None:
        return self.source.removeprefix("registry:") if self.source.startswith("registry:") else None


@dataclass
class ModelSet:
    specs: dict[str, ModelSpec]
    default_tokenizer: str | None
    default_generator: str | None

    def tokenizer(self, name: str | None) -> ModelSpec:
        return self._get(name or self.default_tokenizer, "tokenizer")

    def generator(self, name: str | None) -> ModelSpec:
        return self._get(name or self.default_generator, "generator")

    def _get(self, name: str | None, kind: str) -> ModelSpec:
        names = sorted(n for n, s in self.specs.items() if s.kind == kind)
        if name is None:
            raise NotFound(f"no {kind} is loaded")
        spec = self.specs.get(name)
        if spec is None or spec.kind != kind:
            raise NotFound(f"unknown {kind} {name!r}; loaded: {names}")
        return spec

    def of_kind(self, kind: str) -> list[ModelSpec]:
        return [s for s in self.specs.values() if s.kind == kind]

    def queue_kinds(self) -> list[str]:
        """The queue kinds served: ``encode:<tok>``, ``decode:<tok>`` per tokenizer, ``generate:<gen>``."""
        out = []
        for s in self.specs.values():
            ops = ("encode", "decode") if s.kind == "tokenizer" else ("generate",)
            out += [f"{op}:{s.name}" for op in ops]
        return out


def _parse_entry(entry: str) -> tuple[str | None, str]:
    if "=" in entry:
        name, _, target = entry.partition("=")
        return name.strip(), target.strip()
    return None, entry.strip()


def _folder_name(folder: Path) -> str:
    folder = folder.resolve()
    if folder.name in GENERIC_FOLDER_NAMES and folder.parent.name:
        return f"{folder.parent.name}-{folder.name}"
    return folder.name


def _read(entry: str) -> tuple[str, str, bool, Any]:
    """(name, source, random_weights, config) of one TOKSERVE_MODELS entry."""
    from models.hub import read_config
    from models.registry import get_config, list_models

    name, target = _parse_entry(entry)
    path = Path(target)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model folder {path} has no config.json")
        _, cfg = read_config(path)
        return name or _folder_name(path), str(path), False, cfg
    if target in list_models():
        return name or target, f"registry:{target}", True, get_config(target)
    raise ValueError(f"model {target!r} is neither a folder with config.json nor a registered configuration "
                     f"(known: {', '.join(list_models())})")


def _spec(name: str, source: str, random_weights: bool, cfg: Any) -> ModelSpec:
    if hasattr(cfg, "num_classes") and hasattr(cfg, "family"):
        family = cfg.family
        if family not in FAMILY_SAMPLERS:
            raise ValueError(f"{name}: generator family {family!r} is not servable")
        classes = tuple(cfg.trained_classes) or tuple(range(cfg.num_classes))
        defaults = {"sampler": cfg.sampler, "steps": cfg.steps, "cfg_scale": cfg.cfg_scale,
                    "guidance_interval": [cfg.guidance_low, cfg.guidance_high], "path_type": cfg.path_type}
        return ModelSpec(name=name, kind="generator", family=family, source=source, random_weights=random_weights,
                         config=cfg, image_size=0, token_shape=(cfg.num_tokens, cfg.token_dim),
                         tokenizer=cfg.tokenizer or None, classes=classes, num_classes=cfg.num_classes,
                         samplers=FAMILY_SAMPLERS[family], defaults=defaults)
    if all(hasattr(cfg, a) for a in ("vq_mean", "vq_std", "num_tokens", "token_dim", "image_size")):
        family = type(cfg).__name__.lower().removesuffix("config")
        return ModelSpec(name=name, kind="tokenizer", family=family, source=source, random_weights=random_weights,
                         config=cfg, image_size=cfg.image_size, token_shape=(cfg.num_tokens, cfg.token_dim),
                         defaults={"preprocess": "center-crop"})
    raise ValueError(f"{name}: {type(cfg).__name__} is not servable (need a 1-D tokenizer or SiT/DiT)")


def _pair(gen: ModelSpec, tokenizers: list[ModelSpec]) -> ModelSpec:
    named = [t for t in tokenizers if t.name == gen.tokenizer]
    if named:
        tok = named[0]
    else:
        fits = [t for t in tokenizers if t.token_shape == gen.token_shape]
        if len(fits) != 1:
            raise ValueError(f"generator {gen.name} needs tokenizer {gen.tokenizer!r} or exactly one loaded "
                             f"tokenizer with token shape {gen.token_shape}; loaded: "
                             f"{[(t.name, t.token_shape) for t in tokenizers]}")
        tok = fits[0]
        if gen.tokenizer:
            log.warning("generator %s names tokenizer %r, which is not loaded: pairing it with %s (same token "
                        "shape %s)", gen.name, gen.tokenizer, tok.name, tok.token_shape)
    if tok.token_shape != gen.token_shape:
        raise ValueError(f"generator {gen.name} makes {gen.token_shape} tokens but {tok.name} decodes "
                         f"{tok.token_shape}")
    return dataclasses.replace(gen, tokenizer=tok.name, image_size=tok.image_size)


def resolve_models(entries: list[str], default_tokenizer: str | None = None,
                   default_generator: str | None = None) -> ModelSet:
    """Read the configurations of ``entries`` (no weights) and pair generators with tokenizers."""
    specs: dict[str, ModelSpec] = {}
    for entry in entries:
        spec = _spec(*_read(entry))
        if spec.name in specs:
            raise ValueError(f"two models named {spec.name!r}; name them with name=folder")
        specs[spec.name] = spec
        if spec.random_weights:
            log.warning("model %s has RANDOM WEIGHTS (registry configuration, no checkpoint)", spec.name)
    tokenizers = [s for s in specs.values() if s.kind == "tokenizer"]
    if not tokenizers:
        raise ValueError("no tokenizer among the models: at least one is needed")
    for name, spec in list(specs.items()):
        if spec.kind == "generator":
            specs[name] = _pair(spec, tokenizers)
    ms = ModelSet(specs, None, None)
    for attr, kind, chosen in (("default_tokenizer", "tokenizer", default_tokenizer),
                               ("default_generator", "generator", default_generator)):
        if chosen is not None:
            ms._get(chosen, kind)
            setattr(ms, attr, chosen)
        else:
            first = ms.of_kind(kind)
            setattr(ms, attr, first[0].name if first else None)
    return ms
