"""Data readers on real rows of the shared Tiny ImageNet parquet, image folders and user parquet files."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from training.data import (
    EpochSampler,
    augment,
    folder_labels,
    iter_parquet,
    load_images,
    resolve_source,
    select_classes,
    tiny_imagenet_class_ids,
    tiny_imagenet_validation,
    to_float,
    to_uint8,
)

VAL = tiny_imagenet_validation()
pytestmark = pytest.mark.skipif(not VAL[0].exists(), reason="shared Tiny ImageNet data not present")


def _raw_rows(n: int) -> list[dict]:
    return pq.ParquetFile(str(VAL[0])).read_row_group(0).slice(0, n).to_pylist()


def test_parquet_rows_decode_to_rgb_with_imagenet_labels() -> None:
    records = list(iter_parquet(VAL, max_images=40))
    rows = _raw_rows(40)
    assert len(records) == 40
    tiny = set(tiny_imagenet_class_ids())
    assert len(tiny) == 200
    for (arr, label), row in zip(records, rows, strict=True):
        assert arr.dtype == np.uint8 and arr.shape == (64, 64, 3)
        assert label == row["label"] and label in tiny
        ref = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))
        np.testing.assert_array_equal(arr, ref)


def test_grayscale_jpeg_becomes_three_equal_channels() -> None:
    rows = _raw_rows(200)
    gray = [i for i, r in enumerate(rows) if Image.open(io.BytesIO(r["image"]["bytes"])).mode == "L"]
    assert gray, "the first row group should hold a grayscale JPEG (about 1.8% are)"
    arr, _ = list(iter_parquet(VAL, max_images=gray[0] + 1))[-1]
    assert arr.shape == (64, 64, 3)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


def test_class_filter_and_limit() -> None:
    keep = select_classes(VAL, num_classes=3)
    assert keep == sorted(tiny_imagenet_class_ids())[:3]
    s = load_images(VAL, 64, classes=keep, max_images=20)
    assert len(s) == 20 and set(s.labels.tolist()) <= set(keep)
    assert s.images.shape == (20, 3, 64, 64) and s.images.dtype == torch.uint8


def test_resize_through_center_crop() -> None:
    s = load_images(VAL, 32, max_images=3)
    assert s.images.shape == (3, 3, 32, 32)


def test_image_folder_with_wnid_and_plain_names(tmp_path) -> None:
    rows = _raw_rows(4)
    for i, row in enumerate(rows):
        d = tmp_path / "wn" / row["wnid"]
        d.mkdir(parents=True, exist_ok=True)
        Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").resize((80, 60)).save(d / f"{i}.png")
    kind, paths = resolve_source(tmp_path / "wn")
    assert kind == "folder"
    s = load_images(tmp_path / "wn", 64)
    assert s.images.shape == (4, 3, 64, 64)
    assert sorted(s.labels.tolist()) == sorted(r["label"] for r in rows)
    assert folder_labels(["cats", "dogs"]) == {"cats": 0, "dogs": 1}
    assert folder_labels(["7", "12"]) == {"7": 7, "12": 12}


def test_user_parquet_with_other_columns(tmp_path) -> None:
    rows = _raw_rows(5)
    table = pa.table({"img": [r["image"]["bytes"] for r in rows], "cls": [r["label"] for r in rows]})
    pq.write_table(table, tmp_path / "mine.parquet", row_group_size=2)
    s = load_images(tmp_path / "mine.parquet", 64, image_column="img", label_column="cls")
    assert s.labels.tolist() == [r["label"] for r in rows]
    ref = load_images(VAL, 64, max_images=5)
    assert torch.equal(s.images, ref.images)


def test_augment_flip_and_crop_are_seeded() -> None:
    s = load_images(VAL, 64, max_images=8)
    a = augment(s.images, 64, torch.Generator().manual_seed(3), flip=True)
    b = augment(s.images, 64, torch.Generator().manual_seed(3), flip=True)
    assert torch.equal(a, b) and a.shape == (8, 3, 64, 64)
    x = to_float(s.images)
    flipped = [torch.equal(a[i], x[i].flip(-1)) for i in range(8)]
    kept = [torch.equal(a[i], x[i]) for i in range(8)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)
    c = augment(s.images, 48, torch.Generator().manual_seed(0), crop_scale=(0.5, 0.9), flip=False)
    assert c.shape == (8, 3, 48, 48) and c.min() >= -1.0001 and c.max() <= 1.0001
    assert torch.equal(to_uint8(to_float(s.images)), s.images)


def test_epoch_sampler_is_a_resumable_permutation() -> None:
    smp = EpochSampler(10, 3, seed=1)
    first_epoch = torch.cat([smp.indices(i) for i in range(3)])
    assert len(set(first_epoch.tolist())) == 9  # one epoch: distinct indices, the last partial batch dropped
    fresh = EpochSampler(10, 3, seed=1)
    assert torch.equal(fresh.indices(4), smp.indices(4))  # batch 4 depends only on (seed, step)
    assert not torch.equal(EpochSampler(10, 3, seed=2).indices(0), smp.indices(0))
