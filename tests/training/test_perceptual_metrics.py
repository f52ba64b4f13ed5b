"""LPIPS, the restricted unpickler, EfficientNet-Lite0, FID, PSNR and SSIM on real images."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from training.data import load_images, tiny_imagenet_validation, to_float
from training.losses import softvq_kl
from training.metrics import FeatureStats, InceptionFeatures, frechet_distance, psnr, ssim
from training.perceptual import LPIPS, EfficientNetLite0, read_numpy_pickle

VAL = tiny_imagenet_validation()
pytestmark = pytest.mark.skipif(not VAL[0].exists(), reason="shared Tiny ImageNet data not present")


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    return load_images(VAL, 64, max_images=24).images


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    return LPIPS("vgg16")


def test_lpips_properties(real: torch.Tensor, lpips: LPIPS) -> None:
    x = to_float(real[:8])
    g = torch.Generator().manual_seed(0)
    weak = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    strong = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        same = lpips(x, x)
        d_weak, d_strong = lpips(x, weak), lpips(x, strong)
        sym = lpips(strong, x)
        other = lpips(x, to_float(real[8:16]))
    assert same.shape == (8,) and torch.allclose(same, torch.zeros(8), atol=1e-6)
    assert torch.allclose(d_strong, sym, atol=1e-5)
    assert (d_weak > 0).all() and (d_strong > d_weak).all()
    assert other.mean() > d_weak.mean() and 0.3 < float(other.mean()) < 1.2  # unrelated photos are far apart


def test_lpips_is_frozen_but_differentiable(real: torch.Tensor, lpips: LPIPS) -> None:
    assert not any(p.requires_grad for p in lpips.parameters())
    x = to_float(real[:2]).requires_grad_(True)
    lpips(x, to_float(real[2:4])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    lpips.train()
    assert not lpips.training


def test_lpips_alexnet_loads(real: torch.Tensor) -> None:
    x = to_float(real[:4])
    with torch.no_grad():
        d = LPIPS("alexnet")(x, x.flip(-1))
    assert d.shape == (4,) and (d > 0).all()


def test_restricted_unpickler_refuses_code(tmp_path) -> None:
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"a": {"kernel": np.ones((1, 1, 2, 3), np.float32)}}))
    assert read_numpy_pickle(ok)["a"]["kernel"].shape == (1, 1, 2, 3)
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"x": math.floor}))
    with pytest.raises(pickle.UnpicklingError):
        read_numpy_pickle(bad)


def test_efficientnet_classifies_real_images_above_chance() -> None:
    s = load_images(VAL, 64, max_images=48)
    clf = EfficientNetLite0()
    with torch.no_grad():
        logits = clf.logits(to_float(s.images))
        feats = clf.features(to_float(s.images[:2]))
    assert logits.shape == (48, 1000) and feats.shape == (2, 1280, 7, 7)
    acc = float((logits.argmax(1) == s.labels).float().mean())
    assert acc > 0.15  # chance is 0.1%; about 34% measured on 1,000 images at 64 px


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_distortion(real: torch.Tensor) -> None:
    inc = InceptionFeatures()
    f = inc.features(real)
    assert f.shape == (24, 2048)
    a = FeatureStats.of(f)
    assert abs(frechet_distance(a, a)) < 1e-3
    noisy = (real.float() + 40 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255)
    b = FeatureStats.of(inc.features(noisy.to(torch.uint8)))
    assert frechet_distance(a, b) > 1.0


def test_frechet_distance_matches_closed_form() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3))
    y = rng.normal(size=(4000, 3)) * 2.0 + 1.0
    # N(0, I) vs N(1, 4I): |mu|^2 = 3, trace term 3 * (1 + 4 - 2 * 2) = 3
    assert abs(frechet_distance(FeatureStats.of(x), FeatureStats.of(y)) - 6.0) < 0.4


def test_psnr_and_ssim(real: torch.Tensor) -> None:
    shifted = (real.int() + 10).clamp(0, 255).to(torch.uint8)
    exact = (real.int() <= 245).flatten(1).all(1)
    expected = 10 * math.log10(255**2 / 100)
    assert torch.allclose(psnr(real, shifted)[exact].float(), torch.tensor(expected), atol=1e-4)
    assert torch.isinf(psnr(real, real)).all()
    s_same = ssim(real, real)
    assert torch.allclose(s_same, torch.ones_like(s_same))
    g = torch.Generator().manual_seed(0)
    noisy1 = (real.float() + 8 * torch.randn(real.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    noisy2 = (real.float() + 30 * torch.randn(real.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    assert (ssim(real, noisy2) < ssim(real, noisy1)).all() and (ssim(real, noisy1) < 1).all()


def test_softvq_kl_prefers_confident_diverse_assignments() -> None:
    k = 16
    confident_diverse = torch.eye(k).repeat(4, 1)  # every code used, each token one-hot
    collapsed = torch.zeros(4 * k, k)
    collapsed[:, 0] = 1  # one code for everything
    uniform = torch.full((4 * k, k), 1 / k)
    assert softvq_kl(confident_diverse) < softvq_kl(uniform)
    assert softvq_kl(confident_diverse) < softvq_kl(collapsed)
    assert abs(float(softvq_kl(confident_diverse)) + math.log(k)) < 1e-4
