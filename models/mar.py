"""MAR: masked autoregressive generation with a per-token diffusion head (Li et al., 2024).

An MAE-style bidirectional transformer over a 1-D token sequence: the encoder sees ``buffer_size`` class
slots plus the *known* tokens only, the decoder sees every position (unknown ones hold ``mask_token``) and
emits one condition vector per token; a small adaLN MLP (:class:`DiffusionMLP`, under ``diffloss.net``)
predicts the noise and the variance interpolation of one token from (noisy token, step, condition). State-dict
keys and shapes follow the published ``LTH14/mar`` checkpoints (``../shared/reference/FORMATS-MAR-XQV.md``
sections 1.1-1.4), so their ``model_ema`` state dicts load as they are.

Nothing assumes a square token grid: the sequence length is ``num_tokens`` (256 for KL-16 at 256 px, 64 or
32 for SoftVQ). Sampling (orders, reveal schedule, guidance, the head's DDPM loop) lives in
:mod:`models.sampling.mar`; this module is two network evaluations:

* :meth:`MAR.forward` / :meth:`MAR.backbone`: (tokens (B, L, C), mask (B, L) bool, labels (B,)) -> z
  (B, L, D); rows may have different numbers of known tokens (padded with an attention mask).
* :meth:`MAR.head`: (x (N, C), t (N,), z (N, D)) -> (N, 2C) = [eps | variance interpolation v in [-1, 1]].
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from models.dit import TimestepEmbedder, timestep_frequencies
from models.iterative import CFG_SCHEDULES, IterativeConfigMixin
from models.registry import register_config, register_model_class
from models.surface import GeneratorConfigBase, SampleSpec

LN_EPS = 1e-6


@dataclass(frozen=True)
class MARConfig(IterativeConfigMixin, GeneratorConfigBase):
    """Architecture, training constants and sampling defaults of a MAR generator.

    ``num_tokens`` x ``token_dim`` is the latent shape (L, C) of the tokenizer named by ``tokenizer``; the
    generator works on normalised latents (the tokenizer's ``(z - vq_mean) / vq_std``; KL-16's tokens come
    pre-scaled). ``trained_classes`` lists the ImageNet-1k ids the weights know (empty: all). Encoder and
    decoder share ``hidden_size`` and ``num_heads`` as in every published MAR. ``diffloss_depth`` /
    ``diffloss_width`` size the per-token head. The last block of fields are defaults a server uses when a
    request leaves them out (``num_iter`` is the request's ``steps``).
    """

    family: ClassVar[str] = "mar"

    num_tokens: int = 256
    token_dim: int = 16
    hidden_size: int = 768
    encoder_depth: int = 12
    decoder_depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    diffloss_depth: int = 6
    diffloss_width: int = 1024
    class_dropout_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    tokenizer: str = "kl16"
    # training constants of the head's diffusion and of the masking (FORMATS-MAR-XQV 1.1)
    num_train_timesteps: int = 1000
    noise_schedule: str = "cosine"
    mask_ratio_min: float = 0.7
    diffusion_batch_mul: int = 4
    # sampling defaults
    num_iter: int = 64
    cfg_schedule: str = "linear"
    temperature: float = 1.0
    diffusion_steps: int = 100
    clip_x0: float = 0.0  # > 0: clamp the head's predicted clean token to [-clip_x0, clip_x0] while sampling
    #                       (0 = off, as published; small CPU-trained heads need it: their first respaced step
    #                       amplifies eps error ~600x at t = 999)

    def __post_init__(self) -> None:
        self.check_common()
        if self.noise_schedule != "cosine":
            raise ValueError("MAR's head uses the cosine noise schedule")
        if not 2 <= self.diffusion_steps <= self.num_train_timesteps:
            raise ValueError(f"diffusion_steps must lie in [2, {self.num_train_timesteps}]")
        if self.buffer_size < 1:
            raise ValueError("buffer_size must be positive")
        if self.clip_x0 < 0:
            raise ValueError("clip_x0 must be >= 0 (0 = off)")

    def sample_spec(self) -> SampleSpec:
        """Normalised latents (L, C) float32."""
        return SampleSpec((self.num_tokens, self.token_dim), "float32")

    def sampling_extras(self) -> dict[str, Any]:
        return {"cfg_schedule": self.cfg_schedule, "temperature": self.temperature,
                "diffusion_steps": self.diffusion_steps}

    @property
    def seq_len(self) -> int:
        """Transformer sequence length: class buffer + tokens."""
        return self.buffer_size + self.num_tokens


# ------------------------------------------------------------------------------------- diffusion head


class ResBlock(nn.Module):
    """x (N, W), y (N, W) -> (N, W): ``x + gate * mlp(LN(x) * (1 + scale) + shift)``, with
    (shift, scale, gate) = Linear(SiLU(y)) in that order."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    """x (N, W), y (N, W) -> (N, out): affine-free LN modulated by (shift, scale), then a Linear."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class DiffusionMLP(nn.Module):
    """MAR's ``SimpleMLPAdaLN``: x (N, C) noisy tokens, t (N,) diffusion step (the original 0..999 index,
    float or int), c (N, D) conditions -> (N, 2C) = [eps | v]."""

    def __init__(self, token_dim: int, width: int, cond_dim: int, depth: int) -> None:
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * token_dim)

    def initialize_weights(self) -> None:
        """Xavier Linears with zero bias, N(0, 0.02) timestep MLP, zeroed modulations and output layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.res_blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)
        # the sinusoid is computed in float32, then cast to the weights' dtype (bf16 / fp64 models)
        f = timestep_frequencies(t, self.time_embed.frequency_size).to(h.dtype)
        y = self.time_embed.mlp(f) + self.cond_embed(c)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


class DiffLoss(nn.Module):
    """Holds the head network as ``net`` (the published key prefix is ``diffloss.net.``). The loss itself
    (masked, learned-range hybrid MSE + VLB) is :func:`models.sampling.mar.mar_loss`."""

    def __init__(self, token_dim: int, width: int, cond_dim: int, depth: int) -> None:
        super().__init__()
        self.net = DiffusionMLP(token_dim, width, cond_dim, depth)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, c)


# -------------------------------------------------------------------------------------------- generator


@register_model_class
class MAR(nn.Module):
    """The MAR generator (encoder, decoder, per-token diffusion head); see the module docstring."""

    config_class = MARConfig

    def __init__(self, config: MARConfig) -> None:
        super().__init__()
        self.config = config
        D, L, C, S = config.hidden_size, config.num_tokens, config.token_dim, config.seq_len
        self.grad_checkpointing = False  # a training switch; changes no weights
        block = functools.partial(Block, dim=D, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                                  qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=LN_EPS),
                                  proj_drop=config.proj_dropout, attn_drop=config.attn_dropout)
        self.class_emb = nn.Embedding(config.num_classes, D)
        self.fake_latent = nn.Parameter(torch.zeros(1, D))
        self.z_proj = nn.Linear(C, D)
        self.z_proj_ln = nn.LayerNorm(D, eps=LN_EPS)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, S, D))
        self.encoder_blocks = nn.ModuleList(block() for _ in range(config.encoder_depth))
        self.encoder_norm = nn.LayerNorm(D, eps=LN_EPS)
        self.decoder_embed = nn.Linear(D, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, S, D))
        self.decoder_blocks = nn.ModuleList(block() for _ in range(config.decoder_depth))
        self.decoder_norm = nn.LayerNorm(D, eps=LN_EPS)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        self.diffloss = DiffLoss(C, config.diffloss_width, D, config.diffloss_depth)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """N(0, 0.02) embeddings and learned tokens, xavier Linears with zero bias, unit LayerNorms; the head
        keeps its adaLN-Zero init (:meth:`DiffusionMLP.initialize_weights`)."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.diffloss.net.initialize_weights()

    # -------------------------------------------------------------------------------- pieces

    def class_embedding(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) int64 labels in [0, num_classes] (``num_classes`` = null) -> (B, D). The null label, rows
        with ``force_drop`` and, in training mode, a ``class_dropout_prob`` fraction of rows get
        ``fake_latent``."""
        null = labels == self.config.num_classes
        if force_drop is not None:
            null = null | force_drop.bool()
        elif self.training and self.config.class_dropout_prob > 0:
            null = null | (torch.rand(labels.shape[0], device=labels.device) < self.config.class_dropout_prob)
        emb = self.class_emb(labels.clamp(max=self.config.num_classes - 1))
        return torch.where(null[:, None], self.fake_latent.to(emb.dtype), emb)

    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, attn_mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask=attn_mask)
        return x

    def run_encoder(self, tokens: torch.Tensor, mask: torch.Tensor, cls: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Encoder over the buffer and the known tokens.

        tokens (B, L, C), mask (B, L) bool (True = unknown), cls (B, D) -> (h (B, K, D), index (B, K) int64
        positions in the buffered sequence of length S = buffer + L, valid (B, K) bool or None). Rows keep
        ``buffer + known`` slots; when the counts differ the rows are padded to the largest count K and the
        padding is hidden from attention (``valid``); with equal counts no mask is used (the published path).
        """
        B, L, _ = tokens.shape
        buf = self.config.buffer_size
        x = self.z_proj(tokens)
        x = torch.cat([cls[:, None, :].expand(B, buf, x.shape[-1]).to(x.dtype), x], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        keep = torch.cat([torch.ones(B, buf, dtype=torch.bool, device=mask.device), ~mask.bool()], dim=1)
        counts = keep.sum(dim=1)
        K = int(counts.max())
        # Known positions first, in increasing position order (a stable sort of "is unknown").
        index = torch.sort(~keep, dim=1, stable=True).indices[:, :K]
        h = x.gather(1, index[:, :, None].expand(B, K, x.shape[-1]))
        valid: torch.Tensor | None = None
        attn_mask: torch.Tensor | None = None
        if int(counts.min()) != K:
            valid = torch.arange(K, device=mask.device)[None, :] < counts[:, None]
            attn_mask = torch.zeros(B, 1, 1, K, dtype=h.dtype, device=h.device).masked_fill(
                ~valid[:, None, None, :], float("-inf"))
        h = self.encoder_norm(self._blocks(self.encoder_blocks, h, attn_mask))
        return h, index, valid

    def run_decoder(self, h: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Decoder: encoder output (B, K, D) scattered back to its positions, ``mask_token`` elsewhere ->
        per-token conditions z (B, L, D) (buffer dropped, ``diffusion_pos_embed_learned`` added)."""
        B, K, D = h.shape
        h = self.decoder_embed(h)
        mask_token = self.mask_token.to(h.dtype)
        if valid is not None:  # padding slots point at unknown positions: write the mask token there
            h = torch.where(valid[:, :, None], h, mask_token)
        full = mask_token.expand(B, self.config.seq_len, D).clone()
        full = full.scatter(1, index[:, :, None].expand(B, K, D), h)
        x = self._blocks(self.decoder_blocks, full + self.decoder_pos_embed_learned, None)
        x = self.decoder_norm(x)[:, self.config.buffer_size:]
        return x + self.diffusion_pos_embed_learned

    # -------------------------------------------------------------------------------- evaluations

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L, C) normalised latents (values at unknown positions are ignored), mask (B, L) bool
        (True = unknown), labels (B,) int64 (``num_classes`` = null) -> conditions z (B, L, D)."""
        h, index, valid = self.run_encoder(tokens, mask, self.class_embedding(labels, force_drop))
        return self.run_decoder(h, index, valid)

    def backbone(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The sampler's name for :meth:`forward` (the transformer evaluation)."""
        return self(tokens, mask, labels)

    def head(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The diffusion head: x (N, C) noisy tokens, t (N,) steps in [0, num_train_timesteps), z (N, D)
        -> (N, 2C) [eps | v]."""
        return self.diffloss(x, t, z)


# ------------------------------------------------------------------------------------------ named configs

# name -> (width, encoder depth = decoder depth, heads, head depth, head width, default cfg).
# FORMATS-MAR-XQV 1.1.
PUBLISHED: dict[str, tuple[int, int, int, int, int, float]] = {
    "mar-base": (768, 12, 12, 6, 1024, 2.9),
    "mar-large": (1024, 16, 16, 8, 1280, 3.0),
    "mar-huge": (1280, 20, 16, 12, 1536, 3.2),
}


def _published(width: int, depth: int, heads: int, head_depth: int, head_width: int, cfg: float) -> MARConfig:
    # README: eval at 256 iterations (64 "for speed", our default), 100 head steps, linear cfg, temperature 1
    return MARConfig(num_tokens=256, token_dim=16, hidden_size=width, encoder_depth=depth,
                     decoder_depth=depth, num_heads=heads, buffer_size=64, diffloss_depth=head_depth,
                     diffloss_width=head_width,
                     tokenizer="kl16", num_iter=64, cfg_scale=cfg, cfg_schedule="linear", temperature=1.0,
                     diffusion_steps=100)


SMALL: dict[str, tuple[dict[str, Any], str]] = {
    "mar-tiny-64x32": (
        dict(num_tokens=64, token_dim=32, hidden_size=64, encoder_depth=1, decoder_depth=1, num_heads=2,
             buffer_size=4, diffloss_depth=1, diffloss_width=64, tokenizer="softvq-tiny-64", num_iter=4,
             cfg_scale=1.0, diffusion_steps=10),
        "tiny MAR for tests: 64 tokens x 32 dims (softvq-tiny-64), width 64, 1+1 blocks",
    ),
    "mar-s-64x32": (
        dict(num_tokens=64, token_dim=32, hidden_size=384, encoder_depth=6, decoder_depth=6, num_heads=6,
             buffer_size=16, diffloss_depth=3, diffloss_width=512, tokenizer="softvq-s-64", num_iter=16,
             cfg_scale=1.0, diffusion_steps=50),
        "small MAR on softvq-s-64 tokens (64 px, 64 x 32): width 384, 6+6 blocks, head 3 x 512; 16 iterations"
        " (4 tokens each on average, as the published 64 over 256)",
    ),
}


def _register() -> None:
    for name, spec in PUBLISHED.items():
        register_config(name, MAR, functools.partial(_published, *spec),
                        f"published LTH14/mar {name.replace('-', '_')} on KL-16 tokens (256 x 16), 256 px")
    for name, (fields, desc) in SMALL.items():
        register_config(name, MAR, functools.partial(MARConfig, **fields), desc)


_register()


# Published widths -> heads (every released MAR uses 64-dim heads except mar_huge, 80).
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}


def infer_config(state_dict: dict[str, torch.Tensor], num_heads: int | None = None,
                 **fields: Any) -> MARConfig:
    """The architecture of a MAR state dict, read from its tensor shapes (FORMATS-MAR-XQV section 3, item 1):
    width, token count and dim, buffer, encoder / decoder depths, head depth and width. The head count is
    not in the shapes: ``num_heads`` or the published width table. A published architecture comes back as
    its named config (with its sampling defaults); ``fields`` then overrides any field."""
    D = state_dict["class_emb.weight"].shape[1]
    L = state_dict["diffusion_pos_embed_learned"].shape[1]

    def depth(prefix: str) -> int:
        return len({k.split(".")[len(prefix.split("."))] for k in state_dict if k.startswith(prefix + ".")})

    if num_heads is None:
        if D not in HEADS_BY_WIDTH:
            raise ValueError(f"width {D} is not a published MAR width; pass num_heads")
        num_heads = HEADS_BY_WIDTH[D]
    cfg = MARConfig(
        num_tokens=L, token_dim=state_dict["z_proj.weight"].shape[1], hidden_size=D,
        encoder_depth=depth("encoder_blocks"), decoder_depth=depth("decoder_blocks"), num_heads=num_heads,
        mlp_ratio=state_dict["encoder_blocks.0.mlp.fc1.weight"].shape[0] / D,
        buffer_size=state_dict["encoder_pos_embed_learned"].shape[1] - L,
        diffloss_depth=depth("diffloss.net.res_blocks"),
        diffloss_width=state_dict["diffloss.net.input_proj.weight"].shape[0],
        num_classes=state_dict["class_emb.weight"].shape[0])
    for spec in PUBLISHED.values():  # a published architecture brings its sampling defaults
        pub = _published(*spec)
        if dataclasses.replace(pub, num_iter=cfg.num_iter, cfg_scale=cfg.cfg_scale) == cfg:
            cfg = pub
    return dataclasses.replace(cfg, **fields)


def count_params(config: MARConfig) -> int:
    """Parameter count of a configuration, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = MAR(config)
    return sum(p.numel() for p in model.parameters())


__all__ = ["CFG_SCHEDULES", "DiffLoss", "DiffusionMLP", "MAR", "MARConfig", "PUBLISHED", "SMALL",
           "count_params", "infer_config"]
