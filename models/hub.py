"""Checkpoint I/O: the on-disk unit is a folder with ``config.json`` and safetensors weights.

``save_pretrained`` writes ``config.json`` (class name + config fields) and ``model.safetensors`` (or shards
``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json``). ``load_pretrained`` reads those
folders, and also the published releases: Hugging Face folders whose ``config.json`` is the official
``ModelArgs`` (translated by the family's ``config_class.from_official``), and training dicts nested under
``model`` / ``ema`` / ``state_dict`` (EMA preferred), with ``module.`` / ``_orig_mod.`` prefixes stripped.
Pickle files (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) are refused unless ``allow_pickle=True``; even then
they are read only by torch's weights-only loader; what it refuses loads only with ``unsafe_unpickle=True``
(full unpickling runs code).

Architecture always comes from ``config.json``, never from a file name.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from models.registry import config_from_dict, config_to_dict, model_class

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
PREFIXES = ("module.", "_orig_mod.")
NESTING = ("ema", "model_ema", "model", "state_dict", "module")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the message names the keys and shapes."""


class PickleRefused(CheckpointError):
    pass


# ---------------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike[str], *, allow_pickle: bool = False,
                    select: str | None = None, unsafe_unpickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the raw tensors of a weights file or folder (safetensors, sharded safetensors or, with
    ``allow_pickle``, a torch pickle), unwrapped and with training prefixes stripped. ``select`` is a dotted
    path into a nested checkpoint holding several models (VAR's ``trainer.var_wo_ddp``)."""
    if select is not None:
        obj: Any = _read_raw(Path(path), allow_pickle, unsafe_unpickle)
        for part in select.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                raise CheckpointError(f"{path}: no {select!r} in the checkpoint (stopped at {part!r})")
            obj = obj[part]
        return normalize_state_dict(obj)
    p = Path(path)
    if p.is_dir():
        if (p / INDEX_NAME).exists():
            index = json.loads((p / INDEX_NAME).read_text())
            sd: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                sd.update(load_file(str(p / shard)))
            return normalize_state_dict(sd)
        if (p / WEIGHTS_NAME).exists():
            return normalize_state_dict(load_file(str(p / WEIGHTS_NAME)))
        st = sorted(p.glob("*.safetensors"))
        if len(st) == 1:
            return normalize_state_dict(load_file(str(st[0])))
        pk = [q for q in sorted(p.iterdir()) if q.suffix in PICKLE_SUFFIXES]
        if len(pk) == 1:
            return read_state_dict(pk[0], allow_pickle=allow_pickle, unsafe_unpickle=unsafe_unpickle)
        raise CheckpointError(f"{p}: no {WEIGHTS_NAME}, {INDEX_NAME} or single weights file found")
    return normalize_state_dict(_read_raw(p, allow_pickle, unsafe_unpickle))


def _read_raw(p: Path, allow_pickle: bool, unsafe_unpickle: bool = False) -> Any:
    """The object stored in one weights file: safetensors, or (opted in) a torch pickle."""
    if p.suffix == ".safetensors":
        return load_file(str(p))
    if not allow_pickle:
        raise PickleRefused(
            f"{p}: pickle checkpoints can run code when loaded and are refused; convert to safetensors or "
            "opt in explicitly (allow_pickle=True / TOKSERVE_ALLOW_PICKLE=1)"
        )
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not unsafe_unpickle:
            raise PickleRefused(
                f"{p}: the safe (weights-only) loader refuses this pickle ({str(e).splitlines()[0]}); full "
                "unpickling runs any code the file names: only with unsafe_unpickle=True "
                "(TOKSERVE_UNSAFE_UNPICKLE_RUNS_CODE=1), for files you made yourself") from None
        return torch.load(str(p), map_location="cpu", weights_only=False)  # e.g. an argparse.Namespace inside


def normalize_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Unwrap ``{"ema": ...}``-style nesting (EMA first) and strip ``module.`` / ``_orig_mod.`` prefixes."""
    while isinstance(obj, Mapping) and not _is_flat(obj):
        for key in NESTING:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        else:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                obj = tensors
                break
            raise CheckpointError(f"no state dict found; top-level keys: {sorted(map(str, obj))[:20]}")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        while k.startswith(PREFIXES):  # DDP / torch.compile wrappers of the whole model
            k = k.split(".", 1)[1]
        out[k.replace("._orig_mod.", ".")] = v  # torch.compile of a submodule
    return out


def _is_flat(obj: Mapping[str, Any]) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


# ---------------------------------------------------------------------------------------------- matching


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pat) for pat in patterns)


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy ``state_dict`` into ``model``.

    Keys matching the model's ``IGNORED_KEYS`` are dropped; keys matching ``OPTIONAL_KEYS`` may be missing.
    Anything else unexpected, missing or of the wrong shape raises :class:`CheckpointError` naming it.
    """
    ignored = getattr(model, "IGNORED_KEYS", ())
    optional = getattr(model, "OPTIONAL_KEYS", ())
    own = model.state_dict()
    sd = {k: v for k, v in state_dict.items() if not (_matches(k, ignored) and k not in own)}
    unexpected = sorted(set(sd) - set(own))
    missing = sorted(k for k in set(own) - set(sd) if not _matches(k, optional))
    wrong = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(sd) & set(own)
        if sd[k].shape != own[k].shape
    )
    problems = []
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:20]))
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:20]}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    if problems:
        raise CheckpointError(f"cannot load into {type(model).__name__}: " + " | ".join(problems))
    with torch.no_grad():
        for k, v in sd.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))


# ---------------------------------------------------------------------------------------------- folders


def read_config(folder: str | os.PathLike[str]) -> tuple[type[nn.Module], Any]:
    """(model class, config) from ``folder/config.json``: ours, or a published one recognised by a family."""
    d = json.loads((Path(folder) / CONFIG_NAME).read_text())
    if "class_name" in d:
        return config_from_dict(d)
    from models.official import config_from_official  # the published formats live with the families

    return config_from_official(d)


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    unsafe_unpickle: bool = False,
    weights: str | os.PathLike[str] | None = None,
    select: str | None = None,
    strict: bool = True,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build the model described by ``path/config.json`` and load its weights (``weights`` overrides the
    weights file, e.g. a training checkpoint beside a config; ``select`` picks one model of a nested
    checkpoint, e.g. ``trainer.vae_local``). Returns the model in eval mode."""
    folder = Path(path)
    if not (folder / CONFIG_NAME).exists():
        raise CheckpointError(f"{folder}: no {CONFIG_NAME}; the architecture is never guessed from a file name")
    cls, cfg = read_config(folder)
    model = cls(cfg)
    sd = read_state_dict(weights if weights is not None else folder, allow_pickle=allow_pickle, select=select,
                         unsafe_unpickle=unsafe_unpickle)
    load_into(model, sd, strict=strict)
    return model.to(dtype).eval()


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``config.json`` and the weights (optionally cast, optionally sharded) into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config_to_dict(model), indent=2, sort_keys=True) + "\n")
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
          for k, v in model.state_dict().items()}
    for old in list(out.glob("model*.safetensors")) + [out / INDEX_NAME]:
        old.unlink(missing_ok=True)
    if max_shard_bytes is None or sum(t.numel() * t.element_size() for t in sd.values()) <= max_shard_bytes:
        save_file(sd, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k in sorted(sd):
            b = sd[k].numel() * sd[k].element_size()
            if shards[-1] and size + b > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = sd[k]
            size += b
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    return out


__all__ = [
    "CheckpointError",
    "PickleRefused",
    "load_into",
    "load_pretrained",
    "model_class",
    "normalize_state_dict",
    "read_config",
    "read_state_dict",
    "save_pretrained",
]


GENERIC_FOLDER_NAMES = ("tokenizer", "generator", "model", "export")


def served_name(folder: str | os.PathLike[str]) -> str:
    """The name a model folder is served under by default (``TOKSERVE_MODELS`` entry without ``name=``): its
    base name, or ``<parent>-<base>`` for the generic ``tokenizer`` / ``generator`` / ``model`` / ``export``
    folders and for every folder of a ``default`` parent (``weights/default/tokenizer`` is
    ``default-tokenizer``, ``runs/x/export`` is ``x-export``)."""
    p = Path(folder).resolve()
    if p.parent.name and (p.name in GENERIC_FOLDER_NAMES or p.parent.name == "default"):
        return f"{p.parent.name}-{p.name}"
    return p.name


def weights_sha256(folder: str | os.PathLike[str]) -> str:
    """sha256 of a model folder's weight files (``*.safetensors``, else pickles), names and contents: the
    identity of those weights, whatever the folder is called or wherever it lies. "" when there are none."""
    p = Path(folder)
    if not p.is_dir():
        return ""
    files = sorted(p.glob("*.safetensors")) or sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if not files:
        return ""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\x00".encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()
