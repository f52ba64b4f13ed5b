"""The latent normalisation shared by every continuous tokenizer that generators are trained on."""

from __future__ import annotations

import torch


def normalize_latents(tokens: torch.Tensor, vq_mean: float, vq_std: float) -> torch.Tensor:
    """Tokens (B, L, D) -> the generator's latent space ``(tokens - vq_mean) / vq_std`` (dtype kept)."""
    return (tokens - vq_mean) / vq_std


def denormalize_latents(latents: torch.Tensor, vq_mean: float, vq_std: float) -> torch.Tensor:
    """Generator latents (B, L, D) -> tokens for ``decode``: ``latents * vq_std + vq_mean`` (dtype kept)."""
    return latents * vq_std + vq_mean


class LatentNormMixin:
    """Generators model ``(tokens - vq_mean) / vq_std`` with the two scalars stored in the tokenizer's config
    (measured on its training set); samples go back through ``latents * vq_std + vq_mean`` before decoding."""

    config: object

    @property
    def vq_mean(self) -> float:
        return self.config.vq_mean  # type: ignore[attr-defined]

    @property
    def vq_std(self) -> float:
        return self.config.vq_std  # type: ignore[attr-defined]

    def normalize_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, D) -> the generator's latent space: ``(tokens - vq_mean) / vq_std``."""
        return normalize_latents(tokens, self.vq_mean, self.vq_std)

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Generator latents (B, L, D) -> tokens for ``decode``: ``latents * vq_std + vq_mean``."""
        return denormalize_latents(latents, self.vq_mean, self.vq_std)
