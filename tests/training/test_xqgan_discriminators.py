"""XQ-GAN discriminators: the published sizes and key layouts (FORMATS-MAR-XQV.md 2.3, meta device), the
PatchGAN's locality, the StyleGAN blur, the frozen-feature discriminator on the real EfficientNet-Lite0
(frozen backbone, trainable heads, gradients to the images), and DiffAugment."""

from __future__ import annotations

import pytest
import torch

from training.xqgan.discriminators import (
    Blur,
    FrozenFeatureDiscriminator,
    PatchGANDiscriminator,
    StyleGANDiscriminator,
    build_discriminator,
    diff_augment,
)


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_patchgan_published_layout() -> None:
    with torch.device("meta"):
        d = PatchGANDiscriminator()
        out = d(torch.empty(2, 3, 256, 256))
    assert _params(d) == 2_765_633
    assert out.shape == (2, 1, 30, 30)
    assert sorted({int(k.split(".")[1]) for k in d.state_dict()}) == [0, 2, 3, 5, 6, 8, 9, 11]
    assert sum(1 for _ in d.state_dict()) == 22


def test_patchgan_judges_local_patches() -> None:
    torch.manual_seed(0)
    d = PatchGANDiscriminator(ndf=8).eval()
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    y = x.clone()
    y[:, :, :8, :8] = -x[:, :, :8, :8]  # change the top-left corner only
    with torch.no_grad():
        a, b = d(x), d(y)
    assert a.shape == (1, 1, 14, 14)
    changed = (a - b).abs()[0, 0] > 0
    assert changed[0, 0]  # the patch that sees the corner changes
    assert not changed[6:, 6:].any()  # patches 70 px away do not


def test_stylegan_published_size_and_output() -> None:
    with torch.device("meta"):
        d = StyleGANDiscriminator(256)
    assert _params(d) == 36_500_225
    assert sum(1 for k in d.state_dict() if k.startswith("blocks.")) > 0
    assert {k.split(".")[0] for k in d.state_dict()} == {"blocks", "final_conv", "final_linear"}
    torch.manual_seed(0)
    small = StyleGANDiscriminator(32, base_channels=8, max_channels=32)
    out = small(torch.rand(3, 3, 32, 32) * 2 - 1)
    assert out.shape == (3, 1)
    with pytest.raises(ValueError, match="power-of-two"):
        StyleGANDiscriminator(48)


def test_blur_is_normalised_low_pass() -> None:
    blur = Blur()
    const = torch.full((1, 2, 6, 6), 0.3)
    torch.testing.assert_close(blur(const), const)
    checker = (torch.arange(6)[:, None] + torch.arange(6)[None, :]) % 2 * 2.0 - 1.0  # highest frequency
    assert float(blur(checker.view(1, 1, 6, 6)).abs().max()) < 0.3


@pytest.fixture(scope="module")
def feature_disc() -> FrozenFeatureDiscriminator:
    torch.manual_seed(0)
    return FrozenFeatureDiscriminator(resolution=64, taps=("stem", 2, 4))  # real EfficientNet-Lite0 weights


def test_frozen_feature_discriminator(feature_disc: FrozenFeatureDiscriminator) -> None:
    d = feature_disc.train()
    x = (torch.rand(4, 3, 32, 32) * 2 - 1).requires_grad_(True)
    logits = d(x)
    # taps at 64 px: stem 32x32, block 2 16x16, block 4 8x8 positions
    assert logits.shape == (4, 32 * 32 + 16 * 16 + 8 * 8)
    logits.mean().backward()
    backbone = list(d.backbone.parameters())
    assert backbone and all(p.grad is None and not p.requires_grad for p in backbone)
    assert all(p.grad is not None for p in d.parameters())
    assert x.grad is not None and float(x.grad.abs().sum()) > 0  # the generator still gets a gradient
    # the backbone is not part of the discriminator's parameters or state
    assert _params(d) == sum(_params(h) for h in d.heads)
    assert all(k.startswith("heads.") for k in d.state_dict())
    assert any(k.endswith("weight_orig") for k in d.state_dict())  # spectral norm, as published
    assert not d.backbone.encoder.training  # BatchNorm statistics never move


def test_build_discriminator_names() -> None:
    assert isinstance(build_discriminator("patchgan", 64, ndf=8), PatchGANDiscriminator)
    assert isinstance(build_discriminator("stylegan", 64, ndf=8), StyleGANDiscriminator)
    with pytest.raises(ValueError, match="unknown discriminator"):
        build_discriminator("dinov3", 64)


def test_diff_augment() -> None:
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    a = diff_augment(x, torch.Generator().manual_seed(0))
    b = diff_augment(x, torch.Generator().manual_seed(0))
    c = diff_augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    a.sum().backward()
    assert float(x.grad.abs().sum()) > 0
    # translation only: a shifted copy with zero fill
    t = diff_augment(x.detach(), torch.Generator().manual_seed(2), color=False, cutout=0.0)
    assert ((t == 0) | torch.isin(t, x.detach())).all()
    # cutout only: a 0.25-side square of zeros per image, the rest untouched
    k = diff_augment(x.detach(), torch.Generator().manual_seed(3), color=False, translation=0.0, cutout=0.25)
    zeros = (k == 0).all(dim=1).flatten(1).sum(1)
    assert ((zeros > 0) & (zeros <= 16)).all()
    assert torch.equal(k[k != 0], x.detach()[k != 0])
