"""TAEF2: the pretrained weights load strictly and reproduce the README's PSNR on real validation images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.taef2 import DEFAULT_WEIGHTS, TAEF2, TAEF2Config

pytestmark = pytest.mark.skipif(not (Path(DEFAULT_WEIGHTS) / "taef2_encoder.pth").exists(),
                                reason="shared TAEF2 weights not present")


@pytest.fixture(scope="module")
def taef2() -> TAEF2:
    return TAEF2.from_original()


def test_loads_strictly_and_has_the_documented_size(taef2: TAEF2) -> None:
    n_enc = sum(p.numel() for p in taef2.encoder.parameters())
    n_dec = sum(p.numel() for p in taef2.decoder.parameters())
    assert 1.3e6 < n_enc < 1.4e6 and 1.3e6 < n_dec < 1.4e6
    sd = torch.load(Path(DEFAULT_WEIGHTS) / "taef2_encoder.pth", weights_only=True)
    sd.pop("14.bias")
    with pytest.raises(RuntimeError):
        TAEF2(TAEF2Config()).encoder.load_state_dict(sd, strict=True)


def test_token_surface(taef2: TAEF2) -> None:
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        tokens = taef2.encode(x)
        spatial = taef2.encode_spatial(x)
        y = taef2.decode(tokens)
    assert tokens.shape == (2, 64, 32) and spatial.shape == (2, 32, 8, 8)
    assert torch.equal(tokens, spatial.flatten(2).transpose(1, 2))
    assert y.shape == (2, 3, 64, 64) and y.min() >= -1 and y.max() <= 1
    with pytest.raises(ValueError):
        taef2.decode(torch.zeros(1, 60, 32))


def test_reproduces_readme_psnr_on_validation(taef2: TAEF2) -> None:
    from training.data import load_images, tiny_imagenet_validation, to_float, to_uint8
    from training.metrics import psnr

    if not tiny_imagenet_validation()[0].exists():
        pytest.skip("shared Tiny ImageNet data not present")
    s = load_images("tiny-val", 64, max_images=256)
    with torch.no_grad():
        rec = torch.cat([to_uint8(taef2(to_float(s.images[i : i + 64]))) for i in range(0, 256, 64)])
    value = float(psnr(s.images, rec).mean())
    assert abs(value - 22.08) < 0.1, value  # README: 22.08 dB on the first 256 validation images
