"""Shared fixtures: small seeded models and inputs (no network, no threads settings)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tiny_softvq() -> torch.nn.Module:
    """``softvq-tiny-64`` with seeded random weights, in eval mode (64x64 images, 64 tokens x 32)."""
    from models.registry import create_model

    torch.manual_seed(0)
    return create_model("softvq-tiny-64").eval()


@pytest.fixture
def images64() -> torch.Tensor:
    """(2, 3, 64, 64) seeded random images in [-1, 1]."""
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
