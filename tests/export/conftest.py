"""Fixtures for export tests: tiny stand-in models (independent of models/), and registry-built tiny models
with seeded random weights (zero-initialised layers perturbed so parity compares non-trivial functions)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from export.inputs import random_weights_model


@dataclass(frozen=True)
class StandInTokConfig:
    image_size: int = 16
    num_tokens: int = 8
    token_dim: int = 4
    vq_mean: float = 0.1
    vq_std: float = 0.5


class StandInTokenizer(nn.Module):
    """Patch-linear encoder with a soft quantizer (softmax over 16 codes), linear decoder. (B,3,16,16)<->(B,8,4)."""

    def __init__(self, cfg: StandInTokConfig = StandInTokConfig()) -> None:
        super().__init__()
        self.config = cfg
        self.enc = nn.Linear(3 * cfg.image_size**2, cfg.num_tokens * cfg.token_dim)
        self.codebook = nn.Parameter(torch.randn(16, cfg.token_dim))
        self.dec = nn.Linear(cfg.num_tokens * cfg.token_dim, 3 * cfg.image_size**2)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def token_shape(self) -> tuple[int, int]:
        return (self.config.num_tokens, self.config.token_dim)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.enc(images.flatten(1)).view(images.shape[0], *self.token_shape)
        p = torch.softmax(F.normalize(z, dim=-1) @ F.normalize(self.codebook, dim=-1).T / 0.1, dim=-1)
        return p @ F.normalize(self.codebook, dim=-1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        return torch.tanh(self.dec(tokens.flatten(1))).view(tokens.shape[0], 3, s, s)


@dataclass(frozen=True)
class StandInGenConfig:
    num_tokens: int = 8
    token_dim: int = 4
    num_classes: int = 10
    learn_sigma: bool = False


class StandInGenerator(nn.Module):
    """forward(x (B, 8, 4), t (B,), y (B,)) -> (B, 8, 4 or 8): an MLP conditioned on t and a class table."""

    def __init__(self, cfg: StandInGenConfig = StandInGenConfig()) -> None:
        super().__init__()
        self.config = cfg
        c_out = cfg.token_dim * (2 if cfg.learn_sigma else 1)
        self.y_table = nn.Embedding(cfg.num_classes + 1, 16)
        self.t_proj = nn.Linear(1, 16)
        self.inp = nn.Linear(cfg.token_dim, 16)
        self.out = nn.Linear(16, c_out)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.y_table(y) + self.t_proj(t[:, None])
        return self.out(F.gelu(self.inp(x) + c[:, None, :]))


@pytest.fixture
def standin_tokenizer() -> StandInTokenizer:
    torch.manual_seed(0)
    return StandInTokenizer().eval()


@pytest.fixture
def standin_generator() -> StandInGenerator:
    torch.manual_seed(0)
    return StandInGenerator().eval()


@pytest.fixture
def make_standin_generator():
    """``make_standin_generator(**config_fields)``: a seeded stand-in generator."""

    def make(**fields: object) -> StandInGenerator:
        torch.manual_seed(0)
        return StandInGenerator(StandInGenConfig(**fields)).eval()  # type: ignore[arg-type]

    return make


@pytest.fixture
def registry_model():
    """``registry_model(name, seed=0)``: a registered configuration with seeded random weights, as
    ``python -m export --model NAME`` builds it."""
    return random_weights_model
