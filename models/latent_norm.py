"""The latent normalisation shared by every continuous tokenizer that generators are trained on."""

from __future__ import annotations

import torch


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
        return (tokens - self.vq_mean) / self.vq_std

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Generator latents (B, L, D) -> tokens for ``decode``: ``latents * vq_std + vq_mean``."""
        return latents * self.vq_std + self.vq_mean
