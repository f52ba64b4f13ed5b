"""VAR: visual autoregressive modelling by next-scale prediction (Tian et al., 2024), in the two-branch
"folded" form of ImageFolder (Li et al., 2024). Key-compatible with the published
``VAR-d17-MSVR10P2-4096/ar-ckpt-last.pth`` (``['trainer']['var_wo_ddp']``; ``../shared/reference/FORMATS.md``
2.2-2.4): 233 tensors for depth 17.

One sequence position per code position of a scale map; both branches' codes of a position are predicted
from that one position (the head has G x V logits, one chunk per branch) and the input of a position is the
concatenation of both branches' maps (``word_embed``: G*C -> width). Sequence (L = sum p*p positions):

    scale 0: class embedding + pos_start                       (first_l = p0*p0 positions)
    scale k: word_embed(f_hat so far, area-downsampled to p_k)  (p_k * p_k positions)
    every position: + lvl_embed[scale index] + pos_1LC

Blocks are adaLN transformers conditioned on the class embedding (``ada_lin``: SiLU, Linear(D, 6C) giving
gamma1, gamma2, scale1, scale2, shift1, shift2), with affine-free LayerNorms, attention on l2-normalised q/k
scaled per head by ``exp(min(scale_mul_1H11, log 100))`` (``attn_l2_norm``), q/v biases and a zero k bias,
and a tanh-GELU MLP. Training attends block-causally (``attn_bias_for_masking``: a position sees every
position of its own and earlier scales); inference runs one scale at a time with a KV cache
(:meth:`VAR.forward_scale`), which gives the same logits.

Sampling (guidance ramp, top-k / top-p, per-row generators, batching) lives in :mod:`models.sampling.var`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from models.layers.attention import attend
from models.quantizers.msrq import IMAGEFOLDER_SCALES
from models.registry import register_config, register_model_class
from models.surface import GeneratorConfigBase, SampleSpec

# One layer's cache: keys and values (N, heads, positions so far, head_dim).
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class VARConfig(GeneratorConfigBase):
    """Architecture, training constants and sampling defaults of a VAR generator.

    ``scales`` (``patch_nums``) must equal the tokenizer's; ``num_branches`` x ``codebook_size`` is the head
    width, ``code_dim`` the width of the concatenated branch maps (the tokenizer's G * C, ``Cvae``). The
    published models use ``width = 64 * depth`` and ``num_heads = depth``. Sampling defaults: the published
    ``cfg`` (guidance ramped as ``t = cfg * si / (S - 1)``), ``top_k`` and ``top_p`` (0 = off).
    """

    family: ClassVar[str] = "var"

    depth: int = 16
    width: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    scales: tuple[int, ...] = IMAGEFOLDER_SCALES
    num_branches: int = 2
    codebook_size: int = 4096
    code_dim: int = 64
    attn_l2_norm: bool = True
    norm_eps: float = 1e-6
    cond_drop: float = 0.1
    drop_path_rate: float = 0.0
    cfg_scale: float = 1.5
    top_k: int = 0
    top_p: float = 0.0

    def __post_init__(self) -> None:
        problems = self.check_base()
        if self.width % self.num_heads:
            problems.append(f"width {self.width} not divisible by num_heads {self.num_heads}")
        if not self.scales or any(int(p) < 1 for p in self.scales):
            problems.append(f"scales must be positive, got {self.scales}")
        if self.num_branches < 1 or self.code_dim % self.num_branches:
            problems.append(f"code_dim {self.code_dim} must split evenly over {self.num_branches} branches")
        if self.top_k < 0 or not 0.0 <= self.top_p <= 1.0:
            problems.append("top_k must be >= 0 and top_p in [0, 1]")
        if problems:
            raise ValueError("invalid VARConfig: " + "; ".join(problems))

    @property
    def num_tokens(self) -> int:
        """L: positions of the whole pyramid (286 for ImageFolder's scales)."""
        return sum(int(p) ** 2 for p in self.scales)

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def first_l(self) -> int:
        return int(self.scales[0]) ** 2

    @property
    def vocab_size(self) -> int:
        """Head width: G x V logits, one chunk of V per branch."""
        return self.num_branches * self.codebook_size

    @property
    def steps(self) -> int:
        """Generator-agnostic step count: one step per scale."""
        return self.num_scales

    @property
    def sampler(self) -> str:
        return "var"

    def sample_spec(self) -> SampleSpec:
        """Codes (G, L) int64 (branches x pyramid positions) of ``codebook_size`` values."""
        return SampleSpec((self.num_branches, self.num_tokens), "int64", self.codebook_size)

    def sampling_extras(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "top_p": self.top_p}

    def scale_slices(self) -> list[tuple[int, int]]:
        """[begin, end) of each scale's positions in the sequence."""
        out, cur = [], 0
        for p in self.scales:
            out.append((cur, cur + int(p) ** 2))
            cur += int(p) ** 2
        return out


# ------------------------------------------------------------------------------------------ blocks


class SelfAttention(nn.Module):
    """Multi-head attention with ``mat_qkv`` (no bias) plus ``q_bias`` / ``zero_k_bias`` / ``v_bias``."""

    def __init__(self, dim: int, num_heads: int, l2_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.l2_norm = l2_norm
        if l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None, past: KV | None) -> tuple[torch.Tensor, KV]:
        """x (B, l, C); attn_bias (1, 1, l, P + l) additive or None; past (k, v) each (B, H, P, hd) or None
        -> (B, l, C) and the keys / values of all P + l positions (for the cache)."""
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, l, hd)
        if self.l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        mask = None if attn_bias is None else attn_bias.to(q.dtype)
        out = attend(q, k, v, mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), (k, v)


class FFN(nn.Module):
    """fc1, tanh-approximated GELU, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AdaLNSelfAttn(nn.Module):
    """``x + g1 * attn(LN(x)(1 + s1) + b1)``, ``x + g2 * ffn(LN(x)(1 + s2) + b2)``; the six vectors from
    ``ada_lin(cond)`` in the order g1, g2, s1, s2, b1, b2."""

    def __init__(self, dim: int, cond_dim: int, num_heads: int, mlp_ratio: float, norm_eps: float,
                 l2_norm: bool, drop_path: float) -> None:
        super().__init__()
        self.dim = dim
        self.attn = SelfAttention(dim, num_heads, l2_norm)
        self.ffn = FFN(dim, round(dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor | None, past: KV | None
                ) -> tuple[torch.Tensor, KV]:
        """x (B, l, C), cond (B, D) -> (B, l, C) and this layer's keys / values."""
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cond).view(-1, 1, 6, self.dim).unbind(2)
        h, kv = self.attn(self.ln_wo_grad(x).mul(s1.add(1)).add(b1), attn_bias, past)
        x = x + self.drop_path(h.mul(g1))
        x = x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(s2.add(1)).add(b2)).mul(g2))
        return x, kv


class AdaLNBeforeHead(nn.Module):
    """Affine-free LayerNorm modulated by ``ada_lin(cond)`` = (scale, shift)."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add(shift)


@dataclass
class ScaleOutput:
    """:meth:`VAR.forward_scale`: logits (N, p*p, G*V) of one scale and every layer's cache (k, v), each
    (N, H, positions so far including this scale, hd)."""

    logits: torch.Tensor
    cache: list[KV]


# -------------------------------------------------------------------------------------------- generator


@register_model_class
class VAR(nn.Module):
    """The VAR generator (module docstring). ``forward`` is the teacher-forced training pass over the whole
    pyramid; ``forward_scale`` one KV-cached inference scale."""

    config_class = VARConfig
    # the masked-token ("mlm", p_drop > 0) training variant's embedding; unused at inference
    IGNORED_KEYS = ("empty_emb.*",)

    def __init__(self, config: VARConfig) -> None:
        super().__init__()
        self.config = config
        C, L = config.width, config.num_tokens
        self.word_embed = nn.Linear(config.code_dim, C)
        self.class_emb = nn.Embedding(config.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, config.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(config.num_scales, C)
        d = config.depth
        rates = [config.drop_path_rate * i / (d - 1) if d > 1 else 0.0 for i in range(d)]  # linear in depth
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(C, C, config.num_heads, config.mlp_ratio, config.norm_eps, config.attn_l2_norm, r)
            for r in rates
        )
        level = torch.cat([torch.full((int(p) ** 2,), i, dtype=torch.long) for i, p in enumerate(config.scales)])
        self.register_buffer("lvl_1L", level.view(1, L))
        bias = torch.where(level.view(L, 1) >= level.view(1, L), 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", bias.view(1, 1, L, L).contiguous())
        self.head_nm = AdaLNBeforeHead(C, C, config.norm_eps)
        self.head = nn.Linear(C, config.vocab_size)
        self.init_weights()

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02
                     ) -> None:
        """The published init: trunc-normal(sqrt(1/(3C))) linears and embeddings with zero biases; the head
        and adaLN outputs scaled down; ``proj`` / ``fc2`` divided by sqrt(2 depth)."""
        std = math.sqrt(1 / self.config.width / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        with torch.no_grad():
            self.head.weight.mul_(init_head)
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            C = self.config.width
            for blk in self.blocks:
                blk.attn.proj.weight.div_(math.sqrt(2 * len(self.blocks)))
                blk.ffn.fc2.weight.div_(math.sqrt(2 * len(self.blocks)))
                blk.ada_lin[-1].weight[2 * C:].mul_(init_adaln)
                blk.ada_lin[-1].weight[:2 * C].mul_(init_adaln_gamma)

    # ---------------------------------------------------------------------------------------- pieces

    def class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) int64 in [0, num_classes] (``num_classes`` = null) -> (B, C); in training mode a
        ``cond_drop`` fraction of labels is replaced by the null class."""
        if self.training and self.config.cond_drop > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.config.cond_drop
            labels = torch.where(drop, torch.full_like(labels, self.config.null_class), labels)
        return self.class_emb(labels)

    def level_pos(self) -> torch.Tensor:
        """lvl_embed[lvl_1L] + pos_1LC: (1, L, C)."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Final adaLN and head: x (B, l, C) -> (B, l, G*V), float32 (float64 for a float64 model)."""
        out = self.head(self.head_nm(x, cond))
        return out if out.dtype == torch.float64 else out.float()

    # ---------------------------------------------------------------------------------------- evaluations

    def forward(self, labels: torch.Tensor, x_tf: torch.Tensor) -> torch.Tensor:
        """Teacher-forced pass: labels (B,) int64, x_tf (B, L - first_l, G*C) the inputs of scales 1..S-1
        (the tokenizer's ``teacher_forcing_input``) -> logits (B, L, G*V) (as :meth:`logits`)."""
        cfg = self.config
        B = labels.shape[0]
        if x_tf.shape[1:] != (cfg.num_tokens - cfg.first_l, cfg.code_dim):
            raise ValueError(f"expected x_tf (B, {cfg.num_tokens - cfg.first_l}, {cfg.code_dim}), "
                             f"got {tuple(x_tf.shape)}")
        cond = self.class_embedding(labels)
        sos = cond.unsqueeze(1).expand(B, cfg.first_l, -1) + self.pos_start.expand(B, -1, -1)
        x = torch.cat([sos, self.word_embed(x_tf.to(sos.dtype))], dim=1)
        x = x + self.level_pos()
        bias = self.attn_bias_for_masking
        for blk in self.blocks:
            x, _ = blk(x, cond, bias, None)
        return self.logits(x, cond)

    def forward_scale(self, si: int, labels: torch.Tensor, token_map: torch.Tensor | None,
                      past: list[KV] | None) -> ScaleOutput:
        """One inference scale with a KV cache.

        si: the scale index; labels (N,) int64 (``null_class`` for unconditional rows); token_map
        (N, p_si * p_si, G*C) the scale's input (f_hat so far, area-downsampled; ``None`` at scale 0);
        past: the cache returned by scale ``si - 1`` (``None`` at scale 0). Rows are independent.
        """
        cfg = self.config
        if not 0 <= si < cfg.num_scales:
            raise ValueError(f"scale index {si} outside [0, {cfg.num_scales})")
        if (si == 0) != (past is None) or (si == 0) != (token_map is None):
            raise ValueError("scale 0 takes no token_map / past; later scales need both")
        begin, end = cfg.scale_slices()[si]
        cond = self.class_emb(labels)
        lvl_pos = self.level_pos()[:, begin:end]
        if si == 0:
            n = labels.shape[0]
            x = cond.unsqueeze(1).expand(n, cfg.first_l, -1) + self.pos_start.expand(n, -1, -1) + lvl_pos
        else:
            assert token_map is not None
            x = self.word_embed(token_map.to(cond.dtype)) + lvl_pos
        cache: list[KV] = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, cond, None, None if past is None else past[i])
            cache.append(kv)
        return ScaleOutput(self.logits(x, cond), cache)


# ------------------------------------------------------------------------------------------ named configs


def _published_d(depth: int, codebook_size: int, tokenizer: str) -> VARConfig:
    # models/__init__.py build_vae_var: heads = depth, width = 64 * depth, drop path 0.1 * depth / 24;
    # README inference: cfg 3.25, top-k 750, top-p 0.95.
    return VARConfig(depth=depth, width=64 * depth, num_heads=depth, num_classes=1000, scales=IMAGEFOLDER_SCALES,
                     num_branches=2, codebook_size=codebook_size, code_dim=64, attn_l2_norm=True,
                     cond_drop=0.1, drop_path_rate=0.1 * depth / 24, tokenizer=tokenizer,
                     cfg_scale=3.25, top_k=750, top_p=0.95)


SMALL: dict[str, tuple[dict[str, Any], str]] = {
    "var-tiny-64": (
        dict(depth=2, width=64, num_heads=2, scales=(1, 2, 3, 4), num_branches=2, codebook_size=64, code_dim=16,
             tokenizer="imagefolder-tiny-64", cfg_scale=1.5, top_k=0, top_p=0.0),
        "tiny VAR for tests on imagefolder-tiny-64 codes (2 x 30, 64 each): width 64, depth 2",
    ),
    "var-s-64": (
        dict(depth=4, width=128, num_heads=4, scales=(1, 2, 3, 4, 6, 8), num_branches=2, codebook_size=512,
             code_dim=16, tokenizer="default-imagefolder", cfg_scale=1.5, top_k=0, top_p=0.0),
        "small VAR on imagefolder-s-64 codes (2 x 130, 512 each): width 128, depth 4 (the shipped CPU-scale model)",
    ),
}


def _register() -> None:
    register_config("var-d17-msvr10p2-4096", VAR,
                    functools.partial(_published_d, 17, 4096, "imagefolder-msvr10p2-4096"),
                    "published VAR-d17 on ImageFolder MSVR10P2-4096 codes (qiuk6/XQ-GAN), 256 px")
    for name, (fields, desc) in SMALL.items():
        register_config(name, VAR, functools.partial(VARConfig, **fields), desc)


_register()


def count_params(config: VARConfig) -> int:
    """Parameter count of a configuration, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = VAR(config)
    return sum(p.numel() for p in model.parameters())


def tokenizer_matches(config: VARConfig, tokenizer_config: Any) -> bool:
    """Whether a tokenizer config (``ImageFolderConfig``) produces the codes this generator models."""
    t = tokenizer_config
    return (tuple(t.scales) == tuple(config.scales) and t.num_branches == config.num_branches
            and t.codebook_size == config.codebook_size and t.num_branches * t.code_dim == config.code_dim)


__all__ = ["KV", "SMALL", "VAR", "AdaLNBeforeHead", "AdaLNSelfAttn", "FFN", "ScaleOutput", "SelfAttention",
           "VARConfig", "count_params", "tokenizer_matches"]
