"""The plain ViT used by the SoftVQ-VAE encoder and decoder.

Key names, shapes and fp32 numerics follow the DINOv2-style timm ViT of the published SoftVQ releases
(FORMATS.md 1.4 and 1.6):

    cls_token (1, 1, D)            pos_embed (1, 1 + N, D)      patch_embed.proj  Conv2d(C, D, p, stride p)
    blocks.{i}.norm1  LayerNorm(eps 1e-6)     blocks.{i}.attn.qkv  Linear(D, 3D, bias)   blocks.{i}.attn.proj
    blocks.{i}.ls1.gamma (D,)      blocks.{i}.norm2    blocks.{i}.mlp.fc1 / mlp.fc2 (exact GELU)
    blocks.{i}.ls2.gamma (D,)      norm  LayerNorm(eps 1e-6)

The rows of ``qkv.weight`` are ``[q | k | v]`` with heads contiguous inside each; the class token is
concatenated first and then ``pos_embed`` (which covers it) is added. Attention runs through
:func:`models.layers.attention.attend`: SDPA by default (within ~1e-6 of the reference's explicit softmax in
fp32), the official explicit form under ``attention_mode("exact")`` (``TOKSERVE_ATTENTION=exact``) or with
``Attention.fused = False`` (:func:`set_fused_attention`, e.g. for exporters).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale, Mlp, PatchEmbed, trunc_normal_

from models.layers.attention import attend

LN_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias) and an output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = True
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, hd)
        out = attend(q, k, v, scale=self.scale, fused=self.fused)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        init_values: float = 1e-5,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.ls1 = LayerScale(dim, init_values=init_values)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, init_values=init_values)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT trunk with a class token and a learned absolute position table over [cls, patches].

    The SoftVQ encoder and decoder drive it step by step (:meth:`patchify`, :meth:`add_cls_and_pos`,
    :meth:`run`), because both append latent tokens after the position embedding.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        init_values: float = 1e-5,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, init_values=init_values, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.init_weights()

    def init_weights(self) -> None:
        """timm-style init: trunc-normal(0.02) position table and linears, tiny class token."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> patch tokens (B, N, D), patches in row-major order."""
        h, w = images.shape[-2:]
        if (h, w) != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {h}x{w}")
        return self.patch_embed(images)

    def add_cls_and_pos(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) -> (B, 1 + N, D): prepend the class token, then add ``pos_embed``."""
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, D) -> blocks -> final LayerNorm -> (B, S, D)."""
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def set_fused_attention(module: nn.Module, fused: bool) -> None:
    """Switch every :class:`Attention` under ``module`` between SDPA (``True``) and explicit softmax."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.fused = fused


def unpatchify(x: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Patch vectors (B, h*w, p*p*C), each ordered (p, q, c) with channel last, -> images (B, C, h*p, w*p)."""
    b, n, _ = x.shape
    h = w = math.isqrt(int(n))  # int(): under tracing n is a tensor
    if h * w != n:
        raise ValueError(f"{n} patches do not form a square grid")
    x = x.reshape(b, h, w, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, h * patch_size, w * patch_size)


class ToPixel(nn.Module):
    """Linear head from decoder width to pixels of one patch, then :func:`unpatchify` (key ``model``)."""

    def __init__(self, in_dim: int, patch_size: int, channels: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.channels = channels
        self.model = nn.Linear(in_dim, patch_size * patch_size * channels)
        trunc_normal_(self.model.weight, std=0.02)  # start near zero (mid-grey) when trained from scratch
        nn.init.zeros_(self.model.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) -> images (B, C, H, W), not clamped."""
        return unpatchify(self.model(x), self.patch_size, self.channels)
