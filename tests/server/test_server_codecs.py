"""Codecs: image decoding / conversion / limits, preprocessing, tensor wire formats."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save
from server_testkit import png_bytes, real_jpegs

from models.preprocess import center_crop_arr, preprocess_image, resize_arr, to_model_input, to_uint8
from server.codecs import (
    decode_base64,
    decode_image,
    encode_images,
    images_to_tensor,
    tensor_from_json,
    tensor_from_npy,
    tensor_from_safetensors,
    tensor_to_json,
    tensor_to_npy,
    tensor_to_safetensors,
    validate_tokens,
)
from server.errors import BadRequest, InvalidValue, PayloadTooLarge, UnsupportedMediaType

BIG = 10_000_000


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- images in


def test_real_jpegs_decode_to_rgb_64() -> None:
    for data, _ in real_jpegs(8):
        img = decode_image(data, max_pixels=BIG)
        assert img.mode == "RGB" and img.size == (64, 64)


def test_grayscale_jpeg_becomes_gray_rgb() -> None:
    gray = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)), "L")
    img = decode_image(_save(gray, "JPEG", quality=95), max_pixels=BIG)
    arr = np.asarray(img)
    assert img.mode == "RGB" and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    arr16 = np.full((8, 8), 65535, dtype=np.uint16)
    arr16[:4] = 257 * 100
    img = decode_image(png_bytes(Image.fromarray(arr16)), max_pixels=BIG)
    out = np.asarray(img)
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[7, 7].tolist() == [255, 255, 255]


def test_alpha_is_composited_over_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, fully transparent on the left half
    rgba[:, 2:, 3] = 255
    out = np.asarray(decode_image(png_bytes(Image.fromarray(rgba, "RGBA")), max_pixels=BIG))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 3].tolist() == [200, 0, 0]


def test_palette_with_transparency_and_la() -> None:
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 0
    assert np.asarray(decode_image(png_bytes(pal, transparency=0), max_pixels=BIG))[0, 0].tolist() == [10, 20, 30]
    la = Image.fromarray(np.stack([np.full((4, 4), 50, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert np.asarray(decode_image(png_bytes(la), max_pixels=BIG))[0, 0].tolist() == [255, 255, 255]


def test_cmyk_jpeg_converted() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(decode_image(_save(cmyk, "JPEG", quality=95), max_pixels=BIG))
    assert out.shape == (16, 16, 3)
    r, g, b = out[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_webp_accepted() -> None:
    img = Image.new("RGB", (20, 10), (0, 128, 255))
    assert decode_image(_save(img, "WEBP", lossless=True), max_pixels=BIG).size == (20, 10)


def test_truncated_jpeg_refused_400() -> None:
    data, _ = real_jpegs(1)[0]
    with pytest.raises(BadRequest, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2], max_pixels=BIG)


def test_truncated_png_refused_400() -> None:
    data = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(BadRequest):
        decode_image(data[: len(data) - 200], max_pixels=BIG)


def test_garbage_and_empty_refused_400() -> None:
    with pytest.raises(BadRequest):
        decode_image(b"definitely not an image", max_pixels=BIG)
    with pytest.raises(BadRequest):
        decode_image(b"", max_pixels=BIG)


def test_other_formats_refused_415() -> None:
    with pytest.raises(UnsupportedMediaType, match="GIF"):
        decode_image(_save(Image.new("RGB", (4, 4)), "GIF"), max_pixels=BIG)
    with pytest.raises(UnsupportedMediaType, match="BMP"):
        decode_image(_save(Image.new("RGB", (4, 4)), "BMP"), max_pixels=BIG)


def test_max_pixels_checked_before_decoding() -> None:
    data = png_bytes(Image.new("RGB", (300, 200)))
    with pytest.raises(PayloadTooLarge, match="300x200"):
        decode_image(data, max_pixels=300 * 200 - 1)
    assert decode_image(data, max_pixels=300 * 200).size == (300, 200)


def test_decompression_bomb_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's bomb limit below our own limit
    with pytest.raises(PayloadTooLarge):
        decode_image(png_bytes(Image.new("RGB", (100, 100))), max_pixels=BIG)


def test_base64() -> None:
    assert decode_base64("aGVsbG8=") == b"hello"
    assert decode_base64("data:image/png;base64,aGVsbG8=") == b"hello"
    with pytest.raises(BadRequest):
        decode_base64("not base64 !!")


# ---------------------------------------------------------------------------------------------- preprocessing


def test_center_crop_identity_on_exact_size() -> None:
    arr = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(center_crop_arr(Image.fromarray(arr), 64), arr)


def test_center_crop_halves_with_box_then_bicubic_then_crops() -> None:
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 255, (300, 520, 3), dtype=np.uint8))  # W=520, H=300
    out = center_crop_arr(img, 64)
    # explicit chain: 300 >= 128 -> halve to (260, 150); 150 >= 128 -> (130, 75); 75 < 128 stop;
    # scale 64/75 -> (round(110.93), 64) = (111, 64); crop x from (111-64)//2 = 23.
    step = img.resize((260, 150), Image.Resampling.BOX).resize((130, 75), Image.Resampling.BOX)
    step = np.asarray(step.resize((111, 64), Image.Resampling.BICUBIC))
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out, step[:, 23:87])


def test_resize_and_unknown_mode() -> None:
    img = Image.new("RGB", (100, 50), (10, 20, 30))
    assert resize_arr(img, 32).shape == (32, 32, 3)
    with pytest.raises(ValueError):
        preprocess_image(img, 32, "stretch")


def test_model_range_round_trip() -> None:
    arr = np.random.default_rng(3).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    x = to_model_input(arr)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert np.abs(to_uint8(x).astype(int) - arr.astype(int)).max() <= 1
    assert to_uint8(torch.full((1, 3, 2, 2), 5.0)).max() == 255 and to_uint8(torch.full((1, 3, 2, 2), -5.0)).max() == 0


def test_images_to_tensor_batch() -> None:
    blobs = [d for d, _ in real_jpegs(3)]
    x = images_to_tensor(blobs, 64, "center-crop", BIG)
    assert x.shape == (3, 3, 64, 64)
    ref = to_model_input(np.asarray(Image.open(io.BytesIO(blobs[1])).convert("RGB")))
    assert torch.equal(x[1], ref[0])


# ---------------------------------------------------------------------------------------------- images out


def test_encode_images_formats() -> None:
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for fmt, magic in (("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        files = encode_images(x, fmt)
        assert len(files) == 2 and all(f.startswith(magic) for f in files)
    png = np.asarray(Image.open(io.BytesIO(encode_images(x, "png")[0])))
    assert np.array_equal(png, to_uint8(x)[0])
    with pytest.raises(InvalidValue):
        encode_images(x, "gif")


# ---------------------------------------------------------------------------------------------- tensors


def test_tensor_json_round_trip() -> None:
    t = torch.randn(2, 4, 3)
    back = tensor_from_json(json.loads(json.dumps(tensor_to_json(t))))
    assert back.dtype == np.float32 and np.array_equal(back, t.numpy())


@pytest.mark.parametrize(("obj", "match"), [
    ({"shape": [2, 3], "dtype": "float32", "data": [1.0] * 5}, "5 numbers but shape"),
    ({"shape": [2, -1], "data": []}, "non-negative"),
    ({"shape": [1], "dtype": "complex64", "data": [1]}, "unsupported dtype"),
    ({"shape": [1], "data": ["a"]}, "only numbers"),
    ({"shape": [1]}, "lacks"),
    ({"shape": [1], "dtype": "int64", "data": [1.5]}, "integer"),
])
def test_tensor_json_errors(obj: dict, match: str) -> None:
    with pytest.raises(InvalidValue, match=match):
        tensor_from_json(obj)


def test_npy_round_trip_and_refusals() -> None:
    t = torch.randn(1, 4, 3)
    assert np.array_equal(tensor_from_npy(tensor_to_npy(t)), t.numpy())
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidValue, match="pickle"):
        tensor_from_npy(buf.getvalue())
    with pytest.raises(BadRequest):
        tensor_from_npy(b"\x93NUMPY garbage")


def test_safetensors_round_trip_and_refusals() -> None:
    t = torch.randn(1, 4, 3)
    assert torch.equal(tensor_from_safetensors(tensor_to_safetensors(t)), t)
    assert torch.equal(tensor_from_safetensors(st_save({"other": t})), t)  # a single tensor of any name
    with pytest.raises(InvalidValue, match="named 'tokens'"):
        tensor_from_safetensors(st_save({"a": t, "b": t.clone()}))
    with pytest.raises(BadRequest):
        tensor_from_safetensors(b"nope")


def test_validate_tokens() -> None:
    ok = validate_tokens(np.zeros((4, 3), np.float64), (4, 3), model="m", max_rows=8)
    assert ok.shape == (1, 4, 3) and ok.dtype == torch.float32
    assert validate_tokens(torch.zeros(2, 4, 3, dtype=torch.bfloat16), (4, 3), model="m", max_rows=8).shape[0] == 2
    with pytest.raises(InvalidValue, match=r"expected \(B, 4, 3\)"):
        validate_tokens(np.zeros((1, 4, 2), np.float32), (4, 3), model="m", max_rows=8)
    with pytest.raises(InvalidValue, match="int64"):
        validate_tokens(np.zeros((1, 4, 3), np.int64), (4, 3), model="m", max_rows=8)
    bad = np.zeros((1, 4, 3), np.float32)
    bad[0, 2, 1] = np.nan
    bad[0, 3, 0] = np.inf
    with pytest.raises(InvalidValue, match=r"1 NaN and 1 infinite.*\(0, 2, 1\)"):
        validate_tokens(bad, (4, 3), model="m", max_rows=8)
    with pytest.raises(InvalidValue, match="infinite"):
        validate_tokens(np.full((1, 4, 3), 1e300), (4, 3), model="m", max_rows=8)  # overflows float32
    with pytest.raises(InvalidValue, match="at most 8"):
        validate_tokens(np.zeros((9, 4, 3), np.float32), (4, 3), model="m", max_rows=8)
