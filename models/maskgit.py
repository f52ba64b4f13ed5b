"""MaskGIT: a bidirectional transformer over discrete codes, trained to predict masked tokens (Chang et al., 2022).

    codes (B, L) int64, masked positions = ``mask_token_id`` (= codebook_size)
      -> token embedding (V + 1 rows: the last is the mask token)              (B, L, D)
      -> prepend the class embedding (num_classes + 1 rows: the last is null)  (B, 1 + L, D)
      -> + learned position embedding, transformer blocks (no causal mask), LayerNorm
      -> drop the class slot, Linear D -> V                                     logits (B, L, V)

Multi-scale codes (CODA, :attr:`models.coda.CODA.code_structure`) are one 1-D sequence of ``sum p^2``
tokens; the learned position embedding tells the scales apart. In training mode a ``class_dropout_prob``
fraction of labels becomes the null class, which gives classifier-free guidance at sampling time.
Sampling (cosine schedule, confidence-based decoding, guidance) is :mod:`models.sampling.maskgit`; the
training objective is :func:`maskgit_loss`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from models.iterative import CFG_SCHEDULES, IterativeConfigMixin
from models.registry import register_config, register_model_class
from models.surface import GeneratorConfigBase, SampleSpec

LN_EPS = 1e-6


@dataclass(frozen=True)
class MaskGITConfig(IterativeConfigMixin, GeneratorConfigBase):
    """Architecture and sampling defaults of a MaskGIT generator over ``num_tokens`` codes of
    ``codebook_size`` values (the tokenizer named by ``tokenizer``). ``trained_classes`` lists the ImageNet-1k
    ids the weights know (empty: all). The last fields are the defaults a server uses when a request leaves
    them out: ``num_iter`` iterations, guidance ``cfg_scale`` with its ``cfg_schedule``, the sampling
    ``temperature`` of the logits and ``choice_temperature``, the scale of the Gumbel noise added to the
    confidences, annealed linearly to 0 over the iterations."""

    family: ClassVar[str] = "maskgit"

    num_tokens: int = 130
    codebook_size: int = 4096
    hidden_size: int = 384
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    dropout: float = 0.0
    tokenizer: str = "coda-taef2-64"
    label_smoothing: float = 0.1
    num_iter: int = 8
    cfg_schedule: str = "linear"
    temperature: float = 1.0
    choice_temperature: float = 4.5

    def __post_init__(self) -> None:
        self.check_common()
        if self.codebook_size < 2:
            raise ValueError("codebook_size must be >= 2")
        if self.temperature <= 0 or self.choice_temperature < 0:
            raise ValueError("temperature must be > 0 and choice_temperature >= 0")

    def sample_spec(self) -> SampleSpec:
        """Codes (L,) int64 of ``codebook_size`` values."""
        return SampleSpec((self.num_tokens,), "int64", self.codebook_size)

    def sampling_extras(self) -> dict[str, Any]:
        return {"cfg_schedule": self.cfg_schedule, "temperature": self.temperature,
                "choice_temperature": self.choice_temperature}

    @property
    def mask_token_id(self) -> int:
        """The input id of a masked position (one past the codebook)."""
        return self.codebook_size


@register_model_class
class MaskGIT(nn.Module):
    """The MaskGIT transformer (module docstring): ``forward(codes (B, L), labels (B,)) -> logits (B, L, V)``."""

    config_class = MaskGITConfig

    def __init__(self, config: MaskGITConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.token_emb = nn.Embedding(config.codebook_size + 1, D)
        self.class_emb = nn.Embedding(config.num_classes + 1, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_tokens, D))
        self.embed_norm = nn.LayerNorm(D, eps=LN_EPS)
        self.blocks = nn.ModuleList(
            Block(D, config.num_heads, config.mlp_ratio, qkv_bias=True, proj_drop=config.dropout,
                  attn_drop=config.dropout, norm_layer=functools.partial(nn.LayerNorm, eps=LN_EPS))
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(D, eps=LN_EPS)
        self.head = nn.Linear(D, config.codebook_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Truncated-normal(0.02) embeddings, positions and Linears with zero bias, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def null_class(self) -> int:
        return self.config.null_class

    def class_labels(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) int64 in [0, num_classes] -> the labels actually embedded: the null class where ``force_drop``
        is set or, in training mode without ``force_drop``, for a ``class_dropout_prob`` fraction of rows."""
        if force_drop is not None:
            return torch.where(force_drop.bool(), self.config.null_class, labels)
        if self.training and self.config.class_dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.config.class_dropout_prob
            return torch.where(drop, self.config.null_class, labels)
        return labels

    def forward(self, codes: torch.Tensor, labels: torch.Tensor,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, L) int64 in [0, V] (V = masked), labels (B,) int64 (``num_classes`` = null) -> logits
        (B, L, V) over the codebook, one row per position."""
        B, L = codes.shape
        if L != self.config.num_tokens:
            raise ValueError(f"expected {self.config.num_tokens} codes per row, got {L}")
        cls = self.class_emb(self.class_labels(labels, force_drop))[:, None, :]
        x = torch.cat([cls, self.token_emb(codes)], dim=1) + self.pos_embed
        x = self.embed_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 1:])


# ------------------------------------------------------------------------------------------------ loss


@dataclass
class MaskGITLoss:
    """``loss``: cross-entropy over the masked positions (label-smoothed); ``accuracy``: the argmax hit rate
    there (detached); ``mask_ratio``: the mean fraction masked."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    mask_ratio: float


def cosine_mask(batch: int, num_tokens: int, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, L) bool: per row, ratio ``cos(pi/2 u)`` with u ~ U[0, 1), ``ceil(ratio L)`` (at least 1) random
    positions masked (MaskGIT's training schedule, the inverse of its cosine decoding schedule)."""
    u = torch.rand(batch, generator=generator)
    counts = torch.ceil(torch.cos(math.pi / 2 * u) * num_tokens).clamp(1, num_tokens).long()
    ranks = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1).argsort(dim=1)
    return (ranks < counts[:, None]).to(device)


def maskgit_loss(model: MaskGIT, codes: torch.Tensor, labels: torch.Tensor, *, mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> MaskGITLoss:
    """The masked-token objective: codes (B, L) int64, labels (B,) int64; ``mask`` (B, L) bool (True =
    hidden) defaults to :func:`cosine_mask`. The model (in training mode it drops labels itself) sees the
    mask token at hidden positions and is scored there only."""
    if mask is None:
        mask = cosine_mask(codes.shape[0], codes.shape[1], generator, codes.device)
    inputs = torch.where(mask, model.config.mask_token_id, codes)
    logits = model(inputs, labels)
    target = codes[mask]
    picked = logits[mask]
    loss = F.cross_entropy(picked.float(), target, label_smoothing=model.config.label_smoothing)
    accuracy = (picked.argmax(-1) == target).float().mean().detach()
    return MaskGITLoss(loss, accuracy, float(mask.float().mean()))


# ------------------------------------------------------------------------------------------ named configs

NAMED: dict[str, tuple[dict[str, object], str]] = {
    "maskgit-tiny": (
        dict(hidden_size=64, depth=2, num_heads=2, num_iter=4),
        "tiny MaskGIT for tests on coda-taef2-64 codes (130 x 4096): width 64, depth 2",
    ),
    "maskgit-s": (
        dict(hidden_size=384, depth=8, num_heads=6, num_iter=8),
        "small MaskGIT on coda-taef2-64 codes (130 tokens of 4096): width 384, depth 8, 6 heads; 8 iterations",
    ),
}


def _register() -> None:
    for name, (fields, desc) in NAMED.items():
        register_config(name, MaskGIT, functools.partial(MaskGITConfig, **fields), desc)


_register()

__all__ = ["CFG_SCHEDULES", "MaskGIT", "MaskGITConfig", "MaskGITLoss", "NAMED", "cosine_mask", "maskgit_loss"]
