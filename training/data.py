"""Image data for training and evaluation: readers, preprocessing and an in-memory image set.

Three sources, one record type ``(uint8 RGB array (H, W, 3), label int)``:

* parquet files in the Hugging Face image layout (``image: struct{bytes, path}``, ``label``), read one
  row group at a time (:func:`iter_parquet`); the Tiny ImageNet shards in ``../shared/data`` are such files
  and their labels are ImageNet-1k ids;
* a folder of images with one sub-folder per class (:func:`iter_image_folder`); a sub-folder named by a
  WordNet id or an integer gets that ImageNet-1k id, other names get their sorted position;
* user parquet files, with other column names (``image_column`` / ``label_column``).

Evaluation preprocessing is the reference tokenizers' ADM centre crop (``center_crop_arr``); training
augmentation (:func:`augment`) is a random crop (scale range) and a horizontal flip, applied to uint8 batches.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from models.preprocess import center_crop_arr, to_uint8_nchw, uint8_to_float  # shared with serving
from training.progress import progress

DATA_ROOT = Path(os.environ.get("TOKSERVE_DATA", "../shared/data"))
TINY = DATA_ROOT / "tiny-imagenet-64"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

Record = tuple[np.ndarray, int]


def tiny_imagenet_train() -> list[Path]:
    """The four Tiny ImageNet train shards (100k images, 500 per class)."""
    return sorted(TINY.glob("train-*.parquet"))


def tiny_imagenet_validation() -> list[Path]:
    """The Tiny ImageNet validation split (10k images, 50 per class)."""
    return [TINY / "validation-00000-of-00001.parquet"]


def imagenet_classes(path: str | os.PathLike[str] | None = None) -> list[dict]:
    """The 1,000 ImageNet-1k classes ``{id, wnid, name, in_tiny_imagenet}`` in id order."""
    return json.loads(Path(path or DATA_ROOT / "imagenet-classes.json").read_text())


def tiny_imagenet_class_ids() -> list[int]:
    """The 200 ImageNet-1k ids that Tiny ImageNet covers, ascending."""
    return [c["id"] for c in imagenet_classes() if c["in_tiny_imagenet"]]


# ---------------------------------------------------------------------------------------------- decoding


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) RGB (grayscale / palette / RGBA converted)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def to_size(arr: np.ndarray, size: int | None) -> np.ndarray:
    """ADM centre crop of a uint8 (H, W, 3) array to (size, size, 3); identity when ``size`` is None or the
    image already has that size."""
    if size is None or arr.shape[:2] == (size, size):
        return arr
    out = center_crop_arr(Image.fromarray(arr), size)
    return out if out.flags.writeable else out.copy()


# ---------------------------------------------------------------------------------------------- readers


def iter_parquet(
    paths: Sequence[str | os.PathLike[str]],
    *,
    classes: Iterable[int] | None = None,
    max_images: int | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
    batch_size: int = 1000,
    skip: int = 0,
) -> Iterator[Record]:
    """Records from parquet files, read one row group (``batch_size`` rows) at a time.

    ``classes`` keeps only those labels; ``max_images`` stops after that many kept records. A missing label
    column gives label -1. The image column is the HF struct ``{bytes, path}`` or plain binary. ``skip`` passes
    over the first that many kept records without decoding them (they still count towards ``max_images``).
    """
    keep = None if classes is None else set(int(c) for c in classes)
    n = 0
    for path in paths:
        pf = pq.ParquetFile(str(path))
        has_label = bool(label_column) and label_column in pf.schema_arrow.names
        for batch in pf.iter_batches(batch_size=batch_size, columns=[image_column] + ([label_column] if has_label else [])):
            labels = batch.column(label_column).to_pylist() if has_label else [-1] * batch.num_rows
            kept = [i for i, label in enumerate(labels) if keep is None or int(label) in keep]
            if max_images is not None:
                kept = kept[: max_images - n]
            if n + len(kept) <= skip:  # the whole row group is skipped: no image bytes to Python
                n += len(kept)
            else:
                images = batch.column(image_column)
                for i in kept:
                    n += 1
                    if n <= skip:
                        continue
                    img = images[i].as_py()
                    yield decode_image(img["bytes"] if isinstance(img, dict) else img), int(labels[i])
            if max_images is not None and n >= max_images:
                return


def folder_labels(names: Sequence[str]) -> dict[str, int]:
    """Sub-folder name -> label: a WordNet id or an integer gives that ImageNet-1k id, else sorted position."""
    by_wnid = {}
    try:
        by_wnid = {c["wnid"]: c["id"] for c in imagenet_classes()}
    except OSError:
        pass
    if all(n in by_wnid for n in names):
        return {n: by_wnid[n] for n in names}
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


def _folder_files(root: Path, classes: Iterable[int] | None) -> list[tuple[Path, int]]:
    """``(path, label)`` of the images under ``root`` (sorted; images directly in ``root`` get label -1)."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    labels = folder_labels([p.name for p in subdirs])
    files: list[tuple[Path, int]] = [(p, -1) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    for d in subdirs:
        files += [(p, labels[d.name]) for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    keep = None if classes is None else set(int(c) for c in classes)
    return [(p, label) for p, label in files if keep is None or label in keep]


def iter_image_folder(
    root: str | os.PathLike[str], *, classes: Iterable[int] | None = None, max_images: int | None = None,
    skip: int = 0,
) -> Iterator[Record]:
    """Records from ``root/<class>/<image>`` (images directly in ``root`` get label -1), sorted by path;
    ``skip`` passes over the first that many without reading them."""
    files = _folder_files(Path(root), classes)
    for path, label in files[skip:max_images]:
        yield decode_image(path.read_bytes()), label


def resolve_source(source: str | os.PathLike[str] | Sequence[str]) -> tuple[str, list[Path]]:
    """``("parquet", files)`` or ``("folder", [root])`` for a source spec.

    Accepted: ``tiny-train`` / ``tiny-val`` (the shared Tiny ImageNet splits), a parquet file, a glob, a
    folder holding parquet files, a folder of class sub-folders of images, or a list of parquet files.
    """
    if isinstance(source, (list, tuple)):
        return "parquet", [Path(s) for s in source]
    s = str(source)
    if s in ("tiny-train", "tiny-imagenet-train"):
        return "parquet", tiny_imagenet_train()
    if s in ("tiny-val", "tiny-validation", "tiny-imagenet-val"):
        return "parquet", tiny_imagenet_validation()
    p = Path(s)
    if p.is_file():
        return "parquet", [p]
    if p.is_dir():
        pq_files = sorted(p.glob("*.parquet"))
        return ("parquet", pq_files) if pq_files else ("folder", [p])
    matches = sorted(Path(m) for m in glob.glob(s))
    if matches:
        return "parquet", matches
    raise FileNotFoundError(f"no data at {s!r}")


def iter_records(source, *, classes: Iterable[int] | None = None, max_images: int | None = None,
                 image_column: str = "image", label_column: str | None = "label", skip: int = 0) -> Iterator[Record]:
    """Decoded records of a source (see :func:`resolve_source`); ``skip`` passes over the first that many kept
    records without decoding them (they count towards ``max_images``: a resumed reader sees the same records)."""
    kind, paths = resolve_source(source)
    if kind == "folder":
        return iter_image_folder(paths[0], classes=classes, max_images=max_images, skip=skip)
    return iter_parquet(paths, classes=classes, max_images=max_images, image_column=image_column,
                        label_column=label_column, skip=skip)


def count_records(source, *, classes: Iterable[int] | None = None, max_images: int | None = None,
                  label_column: str | None = "label") -> int:
    """How many records :func:`iter_records` yields, without decoding any image (parquet: row counts from the
    metadata, or the label column when ``classes`` filters; folder: the file listing)."""
    kind, paths = resolve_source(source)
    if kind == "folder":
        n = len(_folder_files(paths[0], classes))
    elif classes is None:
        n = sum(pq.ParquetFile(str(p)).metadata.num_rows for p in paths)
    else:
        keep = set(int(c) for c in classes)
        n = 0
        for path in paths:
            pf = pq.ParquetFile(str(path))
            if label_column and label_column in pf.schema_arrow.names:
                labels = pf.read(columns=[label_column]).column(label_column).to_pylist()
                n += sum(1 for label in labels if int(label) in keep)
    return n if max_images is None else min(n, max_images)


def source_labels(source, label_column: str = "label") -> list[int]:
    """All labels of a source without decoding images (parquet: the label column; folder: names)."""
    kind, paths = resolve_source(source)
    if kind == "folder":
        root = paths[0]
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        return sorted(set(folder_labels([d.name for d in subdirs]).values()))
    out: list[int] = []
    for path in paths:
        pf = pq.ParquetFile(str(path))
        if label_column in pf.schema_arrow.names:
            out += pf.read(columns=[label_column]).column(label_column).to_pylist()
    return out


def select_classes(source, *, num_classes: int | None = None, classes: Iterable[int] | None = None,
                   label_column: str = "label") -> list[int] | None:
    """The class filter of a run: ``classes`` as given, else the ``num_classes`` smallest labels present in
    the source, else None (all)."""
    if classes is not None:
        return sorted(int(c) for c in classes)
    if num_classes is None:
        return None
    return sorted(set(source_labels(source, label_column)))[:num_classes]


# ---------------------------------------------------------------------------------------------- in memory


@dataclass
class ImageSet:
    """Images held in memory as uint8 (N, 3, H, W) with int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 (B, 3, H, W), int64 (B,))."""
        return self.images[idx], self.labels[idx]

    def save(self, path: str | os.PathLike[str]) -> None:
        torch.save({"images": self.images, "labels": self.labels}, str(path))

    @classmethod
    def load_cache(cls, path: str | os.PathLike[str]) -> ImageSet:
        d = torch.load(str(path), weights_only=True)
        return cls(d["images"], d["labels"])


def load_images(source, size: int, *, classes: Iterable[int] | None = None, max_images: int | None = None,
                image_column: str = "image", label_column: str | None = "label",
                desc: str | None = "loading images") -> ImageSet:
    """Decode a source into memory, each image ADM-centre-cropped to (size, size), with a progress bar named
    ``desc`` (None: no bar, for a handful of images)."""
    total = count_records(source, classes=classes, max_images=max_images, label_column=label_column) if desc else None
    where = f"{len(source)} parquet files" if isinstance(source, (list, tuple)) else str(source)
    label = f"{desc} ({where}, {size}px)" if desc else None
    images, labels = [], []
    with progress(total=total, desc=label) as bar:
        for arr, lab in iter_records(source, classes=classes, max_images=max_images, image_column=image_column,
                                     label_column=label_column):
            images.append(torch.from_numpy(np.ascontiguousarray(to_size(arr, size))).permute(2, 0, 1))
            labels.append(lab)
            bar.update(1)
    if not images:
        raise ValueError(f"no images in {source!r} (classes={classes}, max_images={max_images})")
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------- tensors


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1] (:func:`models.preprocess.uint8_to_float`, as the server)."""
    return uint8_to_float(images)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, 3, H, W): :func:`models.preprocess.to_uint8_nchw`, the one
    pixel convention the server also returns (rounded, clamped)."""
    return to_uint8_nchw(images)


def augment(images: torch.Tensor, size: int, generator: torch.Generator, *, crop_scale: tuple[float, float] = (1.0, 1.0),
            flip: bool = True) -> torch.Tensor:
    """Training augmentation of a uint8 (B, 3, H, W) batch -> float32 (B, 3, size, size) in [-1, 1].

    Each image gets a random square crop whose side is a fraction in ``crop_scale`` of min(H, W) (area-free,
    uniform position), resized to ``size`` (bilinear, antialiased) when needed, and a horizontal flip with
    probability 0.5 when ``flip``.
    """
    b, _, h, w = images.shape
    x = to_float(images)
    lo, hi = crop_scale
    if (lo, hi) != (1.0, 1.0) or (h, w) != (size, size):
        out = torch.empty(b, 3, size, size)
        fr = torch.empty(b).uniform_(lo, hi, generator=generator)
        for i in range(b):
            s = max(1, int(round(float(fr[i]) * min(h, w))))
            top = int(torch.randint(0, h - s + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - s + 1, (1,), generator=generator))
            crop = x[i : i + 1, :, top : top + s, left : left + s]
            if s != size:
                crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            out[i] = crop[0]
        x = out
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


class EpochSampler:
    """Stateless shuffled batches: batch ``step`` is a pure function of (seed, step), so resuming at a step
    reproduces the exact data order. Each epoch is a fresh permutation; the last partial batch is dropped."""

    def __init__(self, n: int, batch_size: int, seed: int = 0) -> None:
        if n < batch_size:
            raise ValueError(f"{n} images is fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]
