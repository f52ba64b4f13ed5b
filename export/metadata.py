"""``export.json``: what a server needs beside the exported graphs.

An export folder holds, per part, ``<part>.onnx`` (plus ``<part>.onnx.data`` for models over 2 GB) and
``<part>.torchscript.pt``, the metadata file ``export.json``, and, when the source was a registry name (random
weights), the source model itself in ``model/`` (``config.json`` + safetensors) so that the ``torch`` runtime
and later parity checks use the same weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.parts import PartSpec

METADATA_NAME = "export.json"
MODEL_DIR = "model"
FORMAT_VERSION = 1
FILE_NAMES = {"onnx": "{part}.onnx", "torchscript": "{part}.torchscript.pt"}


def file_name(part: str, fmt: str) -> str:
    return FILE_NAMES[fmt].format(part=part)


@dataclass
class ExportMetadata:
    """Contents of ``export.json``.

    ``facts`` holds the model kind and, for a tokenizer, ``image_size`` (H, W), ``token_shape`` (L, D),
    ``vq_mean``, ``vq_std``; for a generator ``latent_shape`` (L, C), ``out_channels``, ``num_classes``,
    ``null_class``, ``time_scale``. ``files[part][format]`` is a file name relative to the folder.
    ``parity`` lists :class:`~export.parity.ParityResult` dicts.
    """

    source: str
    model_class: str
    model_config: dict[str, Any]
    facts: dict[str, Any]
    parts: dict[str, PartSpec]
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    opset: int = 18
    exporter: str = "legacy"
    versions: dict[str, str] = field(default_factory=dict)
    tolerance: float = 1e-4
    parity: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def kind(self) -> str:
        return str(self.facts["kind"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "source": self.source,
            "model_class": self.model_class,
            "model_config": self.model_config,
            "facts": self.facts,
            "parts": {k: v.to_dict() for k, v in self.parts.items()},
            "files": self.files,
            "opset": self.opset,
            "exporter": self.exporter,
            "versions": self.versions,
            "tolerance": self.tolerance,
            "parity": self.parity,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportMetadata:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"export.json format_version {d.get('format_version')} != {FORMAT_VERSION}")
        return cls(
            source=d["source"], model_class=d["model_class"], model_config=d["model_config"], facts=d["facts"],
            parts={k: PartSpec.from_dict(v) for k, v in d["parts"].items()}, files=d["files"],
            opset=d["opset"], exporter=d["exporter"], versions=d.get("versions", {}),
            tolerance=d["tolerance"], parity=d.get("parity", []),
        )

    def write(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / METADATA_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def read_metadata(folder: str | os.PathLike[str]) -> ExportMetadata:
    path = Path(folder) / METADATA_NAME
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no {METADATA_NAME}; not an export folder")
    return ExportMetadata.from_dict(json.loads(path.read_text()))


def is_export_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / METADATA_NAME).exists()
