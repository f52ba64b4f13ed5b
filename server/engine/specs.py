"""What is served: a :class:`ModelSpec` per model, read from configurations only (no weights), and the
:class:`ModelSet` the API validates requests against. Weights are loaded by the worker (``runtime.py``).

A model entry of ``TOKSERVE_MODELS`` is a registry name (random weights, deterministic seed), a folder with
``config.json`` + safetensors, or ``name=folder``. A folder's default name is its base name, or
``<parent>-<base>`` for the generic ``tokenizer`` / ``generator`` / ``model`` / ``export`` folders and for
every folder of a ``default`` parent (``weights/default/tokenizer`` is ``default-tokenizer``,
``weights/default/mar`` ``default-mar``, ``runs/x/export`` ``x-export``). A generator is paired with the
tokenizer it was trained on: the loaded tokenizer whose weights have the sha256 its config records
(``tokenizer_sha256``, written by ``python -m training``), else the one its config names, else (with a
warning) the only loaded tokenizer whose token shape matches.

What a model is comes from the model library's surface, never from its class name
(:func:`models.surface.surface_of`): a tokenizer's :class:`~models.surface.TokenSpec` (float32 tokens (L, D),
or int64 codes of their own shape with a ``code_structure``), or a generator's family, the
:class:`~models.surface.SampleSpec` it makes and its sampling defaults. A generator is servable when its family
has a registered sampler (:func:`models.sampling.sampler_family`); that entry also gives the sampler names
and whether the step count is fixed.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from models.sampling import sampler_family
from models.surface import SampleSpec, TokenSpec, surface_of
from server.errors import NotFound

log = logging.getLogger("tokserve.models")


@dataclass(frozen=True)
class ModelSpec:
    """One served model. ``token_shape`` / ``token_dtype``: one image's tokens, (L, D) float32 or int64 codes.
    Tokenizers carry their ``token_spec``; generators the ``sample_spec`` they make, the paired
    ``tokenizer``, the served ``classes``, the null class (``num_classes``), the sampler names, sampling
    ``defaults`` and whether ``steps`` is fixed (``fixed_steps``: only the default is valid)."""

    name: str
    kind: Literal["tokenizer", "generator"]
    family: str
    source: str  # folder path, or "registry:<name>"
    random_weights: bool
    config: Any
    image_size: int
    token_shape: tuple[int, ...]
    token_dtype: str = "float32"  # int64 for discrete tokenizers and the generators of their codes
    code_structure: dict[str, Any] | None = None  # discrete tokenizers: branches, scales, codebook, layout
    tokenizer: str | None = None
    classes: tuple[int, ...] = ()
    num_classes: int | None = None
    samplers: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    fixed_steps: bool = False
    step_noun: str = "steps"
    token_spec: TokenSpec | None = None
    sample_spec: SampleSpec | None = None

    @property
    def discrete(self) -> bool:
        return self.token_dtype == "int64"

    @property
    def codebook_size(self) -> int | None:
        return None if self.code_structure is None else int(self.code_structure["codebook_size"])

    @property
    def tokens_per_image(self) -> int:
        """For the tokens metric: L latent tokens, or every code of a discrete image (G * L ...)."""
        import math

        return math.prod(self.token_shape) if self.discrete else self.token_shape[0]

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
    from models.hub import served_name

    return served_name(folder)


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
    try:
        surface = surface_of(cfg)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{name}: {type(cfg).__name__} is not servable: {e}") from None
    if surface.kind == "generator":
        try:
            family = sampler_family(surface.family)
        except ValueError as e:
            raise ValueError(f"{name}: generator family {surface.family!r} is not servable: {e}") from None
        sample = surface.sample_spec
        assert sample is not None
        return ModelSpec(name=name, kind="generator", family=surface.family, source=source,
                         random_weights=random_weights, config=cfg, image_size=0, token_shape=sample.shape,
                         token_dtype=sample.dtype, tokenizer=cfg.tokenizer or None, classes=cfg.classes,
                         num_classes=cfg.num_classes, samplers=family.samplers, defaults=cfg.sampling_defaults(),
                         fixed_steps=family.fixed_steps, step_noun=family.step_noun, sample_spec=sample)
    ts = surface.token_spec
    assert ts is not None
    return ModelSpec(name=name, kind="tokenizer", family=surface.family, source=source,
                     random_weights=random_weights, config=cfg, image_size=ts.image_size, token_shape=ts.shape,
                     token_dtype=ts.dtype,
                     code_structure=None if ts.code_structure is None else ts.code_structure.as_dict(),
                     defaults={"preprocess": ts.preprocess}, token_spec=ts)


def _pair(gen: ModelSpec, tokenizers: list[ModelSpec]) -> ModelSpec:
    tok = _by_identity(gen, tokenizers)
    named = [t for t in tokenizers if t.name == gen.tokenizer]
    if tok is None and named:
        tok = named[0]
        if gen.config.tokenizer_sha256:
            log.warning("generator %s was trained on tokenizer weights sha256 %s…, which no loaded tokenizer has: "
                        "pairing it by name with %s (other weights: its images may be wrong)", gen.name,
                        gen.config.tokenizer_sha256[:12], tok.name)
    if tok is None:
        fits = [t for t in tokenizers if t.token_shape == gen.token_shape and t.token_dtype == gen.token_dtype]
        if len(fits) != 1:
            raise ValueError(f"generator {gen.name} needs tokenizer {gen.tokenizer!r} or exactly one loaded "
                             f"tokenizer with token shape {gen.token_shape}; loaded: "
                             f"{[(t.name, t.token_shape) for t in tokenizers]}")
        tok = fits[0]
        log.warning("generator %s names tokenizer %r, which is not loaded: pairing it with %s by token shape "
                    "%s only (if that is not the tokenizer it was trained on, its images are wrong)", gen.name,
                    gen.tokenizer, tok.name, tok.token_shape)
    assert gen.sample_spec is not None and tok.token_spec is not None
    misfit = gen.sample_spec.fits(tok.token_spec)
    if misfit is not None:
        raise ValueError(f"generator {gen.name} cannot be decoded by {tok.name}: it {misfit}")
    return dataclasses.replace(gen, tokenizer=tok.name, image_size=tok.image_size)


def _by_identity(gen: ModelSpec, tokenizers: list[ModelSpec]) -> ModelSpec | None:
    """The loaded tokenizer whose weights are those ``gen`` was trained on (its config's
    ``tokenizer_sha256``), preferring the one it names; None when it records none or none matches."""
    want = gen.config.tokenizer_sha256
    if not want:
        return None
    from models.hub import weights_sha256

    same = [t for t in tokenizers if not t.random_weights and weights_sha256(t.source) == want]
    if not same:
        return None
    tok = next((t for t in same if t.name == gen.tokenizer), same[0])
    if tok.name != gen.tokenizer:
        log.info("generator %s: paired with %s, which holds the tokenizer weights it was trained on (its config "
                 "calls that tokenizer %r)", gen.name, tok.name, gen.tokenizer)
    return tok


def resolve_models(entries: list[str], default_tokenizer: str | None = None,
                   default_generator: str | None = None) -> ModelSet:
    """Read the configurations of ``entries`` (no weights) and pair generators with tokenizers."""
    specs: dict[str, ModelSpec] = {}
    entry_of: dict[str, str] = {}
    for entry in entries:
        spec = _spec(*_read(entry))
        if spec.name in specs:
            raise ValueError(f"two models are named {spec.name!r} ({entry_of[spec.name]} and {entry}): name them "
                             f"in TOKSERVE_MODELS with name=path, e.g. {spec.name}-a={_parse_entry(entry_of[spec.name])[1]},"
                             f"{spec.name}-b={_parse_entry(entry)[1]}")
        specs[spec.name] = spec
        entry_of[spec.name] = entry
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
