"""The patch-routing initialisation starts a SoftVQ tokenizer past the uniform-attention plateau."""

from __future__ import annotations

import pytest
import torch

import models
from training.data import load_images, tiny_imagenet_validation, to_float, to_uint8
from training.init import patch_pca, patch_routing_init
from training.metrics import psnr

pytestmark = pytest.mark.skipif(not tiny_imagenet_validation()[0].exists(), reason="shared data not present")


def test_patch_pca_is_orthonormal() -> None:
    x = torch.rand(16, 3, 64, 64) * 2 - 1
    mean, basis = patch_pca(x, 8, 32)
    assert mean.shape == (192,) and basis.shape == (32, 192)
    torch.testing.assert_close(basis @ basis.T, torch.eye(32), atol=1e-4, rtol=0)


def test_routing_init_reconstructs_far_better_than_random() -> None:
    images = load_images("tiny-val", 64, max_images=264).images
    train, val = to_float(images[:200]), images[200:]
    torch.manual_seed(0)
    random = models.create_model("softvq-s-64").eval()
    routed = patch_routing_init(models.create_model("softvq-s-64"), train).eval()
    with torch.no_grad():
        p_random = psnr(val, to_uint8(random.decode(random.encode(to_float(val))))).mean()
        p_routed = psnr(val, to_uint8(routed.decode(routed.encode(to_float(val))))).mean()
    assert p_routed > 14.0 and p_routed > p_random + 3.0, (float(p_random), float(p_routed))
    # only values changed: the state dict still loads into a fresh model of the same config
    models.create_model("softvq-s-64").load_state_dict(routed.state_dict(), strict=True)


def test_routing_init_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        patch_routing_init(models.create_model("softvq-tiny-64"), torch.zeros(4, 3, 64, 64))
