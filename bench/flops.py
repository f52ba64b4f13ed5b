"""Analytical FLOP counts from a configuration: the matmul work of attention, MLPs, embeddings and heads.

One multiply-add counts 2 FLOPs. Counted: every Linear, the patch-embedding convolution (as its matmul),
the two attention products (q k^T and attn v: 4 S^2 D per layer) and the soft quantizer's two einsums;
not counted: norms, softmax, activations, adds (a few per cent of bytes, well under 1% of FLOPs). This is
what ``torch.utils.flop_counter.FlopCounterMode`` counts on the explicit-attention path, which the tests
check on small configurations. For the published sizes it reproduces issue 10's figures: softvq-l-64
encode 204.5 and decode 204.4 GFLOP/img, softvq-bl-64 encode 58.7, SiT-XL/1 on 64x32 tokens 58.07
GFLOP/sample, and 24.7 TFLOP/img for 250 SDE steps with guidance on [0, 0.7] plus a softvq-l-64 decode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from models.sampling.flow import ode_timesteps, sde_timesteps
from models.sampling.guidance import guidance_active


def block_flops(seq: int, width: int, mlp_ratio: float = 4.0) -> int:
    """One pre-norm transformer block on ``seq`` tokens: qkv + proj (8 S D^2), MLP (4 r S D^2),
    attention products (4 S^2 D)."""
    hidden = int(width * mlp_ratio)
    return 2 * seq * width * (3 * width + width) + 2 * 2 * seq * width * hidden + 4 * seq * seq * width


def softvq_encode_flops(cfg: Any) -> int:
    """One image through a SoftVQ encoder (``SoftVQConfig``): patch embedding, ViT over [cls, patches,
    latents], quant_conv, soft quantizer (similarities and weighted sum over the codebook)."""
    n, d = cfg.num_patches, cfg.enc_width
    seq = 1 + n + cfg.num_tokens
    patch = 2 * n * 3 * cfg.patch_size**2 * d
    trunk = cfg.enc_depth * block_flops(seq, d, cfg.mlp_ratio)
    quant_conv = 2 * cfg.num_tokens * d * cfg.token_dim
    quantizer = 2 * 2 * cfg.num_tokens * cfg.codebook_size * cfg.token_dim
    return patch + trunk + quant_conv + quantizer


def softvq_decode_flops(cfg: Any) -> int:
    """One image through a SoftVQ decoder: post_quant_conv, ViT over [cls, mask tokens, latents], pixel head."""
    n, d = cfg.num_patches, cfg.dec_width
    seq = 1 + n + cfg.num_tokens
    post = 2 * cfg.num_tokens * cfg.token_dim * d
    trunk = cfg.dec_depth * block_flops(seq, d, cfg.mlp_ratio)
    head = 2 * n * d * 3 * cfg.patch_size**2
    return post + trunk + head


def generator_forward_flops(cfg: Any, frequency_size: int = 256) -> int:
    """One sample through a SiT / DiT (``GeneratorConfig``): token and time embedders, adaLN-Zero blocks
    (with their per-sample 6D modulation), final adaLN layer."""
    L, D = cfg.num_tokens, cfg.hidden_size
    embed = 2 * L * cfg.token_dim * D + 2 * (frequency_size * D + D * D)
    blocks = cfg.depth * (block_flops(L, D, cfg.mlp_ratio) + 2 * D * 6 * D)
    final = 2 * D * 2 * D + 2 * L * D * cfg.out_channels
    return embed + blocks + final


def forwards_per_image(sampler: str, steps: int, cfg_scale: float = 1.0, low: float = 0.0,
                       high: float = 1.0) -> tuple[int, int]:
    """(conditional, unconditional) model rows one image costs with a SiT step sampler: one row per model
    evaluation (Heun: two per step but the last), plus an unconditional row when guidance is on at the
    step's ``t_cur`` (the sampler's own time grid and rule)."""
    grid = (sde_timesteps(steps) if sampler == "sde" else ode_timesteps(steps)).tolist()
    guided = [guidance_active(cfg_scale, low, high, grid[i]) for i in range(steps)]
    if sampler in ("sde", "euler"):
        return steps, sum(guided)
    if sampler == "heun":
        return 2 * steps - 1, sum(guided) + sum(guided[:-1])
    raise ValueError(f"unknown SiT sampler {sampler!r}")


@dataclass(frozen=True)
class GenerationFlops:
    """Per image: model rows, FLOPs of denoising, of decoding, and total."""

    cond_rows: int
    uncond_rows: int
    denoise: int
    decode: int

    @property
    def rows(self) -> int:
        return self.cond_rows + self.uncond_rows

    @property
    def total(self) -> int:
        return self.denoise + self.decode


def generation_flops(gen_cfg: Any, tok_cfg: Any, sampler: str, steps: int, cfg_scale: float = 1.0,
                     low: float = 0.0, high: float = 1.0) -> GenerationFlops:
    cond, uncond = forwards_per_image(sampler, steps, cfg_scale, low, high)
    return GenerationFlops(cond, uncond, (cond + uncond) * generator_forward_flops(gen_cfg),
                           softvq_decode_flops(tok_cfg))


def count_with_torch(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them (no attention kernel
    formulas on the CPU: switch attention to the explicit path first)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())
