"""The soft vector quantizer of SoftVQ-VAE and its variants (GMM, product, residual).

All follow the package contract of :mod:`models.quantizers.base` and return a :class:`SoftQuantizerOutput`
(a :class:`~models.quantizers.base.QuantizerOutput` that also carries the unweighted entropy terms). Shapes:
tokens z (B, L, d); ``K`` codebooks of ``V`` codes each cover ``K`` contiguous token segments of
``S = L / K`` tokens (token ``k*S + s`` uses codebook ``k``).

* :class:`SoftVectorQuantizer` -- the published quantizer (FORMATS.md 1.5/1.6): tokens and codebook are
  L2-normalised (``F.normalize``, eps 1e-12), ``p = softmax(cos / tau)`` over the V codes, and
  ``z_q = p @ normalised codebook`` (not re-normalised, no straight-through: fully differentiable). Keys
  ``embedding`` (K, V, d) and the float buffer ``codebook_used`` (K, 65536): the official usage history,
  kept so that published files load; it is only updated in training mode and never read at inference.
* :class:`GMMVectorQuantizer` -- a Gaussian-mixture reading of the same posterior. With unit-norm tokens and
  codewords, ``||z - e_v||^2 = 2 - 2 cos``, so a mixture with weights ``pi_v`` and a per-token isotropic
  variance ``sigma^2(z)`` has posterior ``q(v|z) = softmax(cos / sigma^2(z) + log pi_v)``. Here
  ``sigma^2(z) = tau * exp(m * tanh(a(z) / m))`` with ``a`` a linear head on the *un-normalised* token (the
  encoder decides how sharp each token's posterior is) and ``log pi`` a learned (K, V) table. Both start at
  zero, so at initialisation it equals the soft quantizer. Extra keys ``tau_head.{weight,bias}``,
  ``log_prior``.
* :class:`ProductSoftQuantizer` -- G soft quantizers over G equal channel groups (d/G each), concatenated.
* :class:`ResidualSoftQuantizer` -- R soft quantizers applied in turn to the residual of the (normalised)
  token: level r quantizes the *direction* of the current residual and is scaled by a learned scalar
  ``level_scale[r]`` (init ``0.5**r``); ``quantized = sum_r level_scale[r] * q_r``, so every level's code is
  invertible (:meth:`~ResidualSoftQuantizer.indices_to_codes`). With one level it equals the soft quantizer.
  (The generic :mod:`models.quantizers.residual` / ``product`` composites use a straight-through estimator
  made for hard codes, which would cut the soft posterior's gradients; these keep them.) In both composites
  the losses and entropy terms are averaged over the groups / levels.

Training objective (SoftVQ-VAE): the KL term ``H(q) - H(E_x q)``: ``sample_entropy`` is the mean per-token
posterior entropy, ``avg_entropy`` the entropy of the batch-averaged posterior (per codebook, averaged over
codebooks). ``losses["entropy"]`` is ``entropy_weight`` times their difference. By default the posterior
itself is used; ``entropy_tau`` recomputes it from the cosine logits at another temperature (the official
training code used 0.01 there, with weight 0.01).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.quantizers.base import Quantizer, QuantizerOutput, hit_counts, prefixed

USAGE_WINDOW = 65536  # length of the official ``codebook_used`` history buffer
KINDS = ("soft", "gmm", "product", "residual")


@dataclass(frozen=True)
class SoftQuantizerOutput(QuantizerOutput):
    """:class:`~models.quantizers.base.QuantizerOutput` of the soft family, plus the unweighted entropy terms.

    quantized: (B, L, d) continuous tokens.
    indices: argmax codes in per-sample layout, int64: (B, K, L/K); the product / residual quantizers append a
        trailing group / level axis: (B, K, L/K, G) / (B, K, L/K, R).
    probs: the posterior, (B, L, V); (B, L, G, V) / (B, L, R, V) for product / residual.
    losses: ``{"entropy": entropy_weight * (H(q) - H(E_x q))}``, ready to sum; empty without losses.
    usage: ``codebook{k}`` -> hit counts (V,) of the argmax codes in this call (prefixed ``group{g}/`` or
        ``level{r}/`` in the composites); empty without losses.
    sample_entropy / avg_entropy: the unweighted terms H(q) and H(E_x q) (scalars); ``None`` without losses.
    """

    sample_entropy: Tensor | None = None
    avg_entropy: Tensor | None = None


def entropy_terms(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(H(q), H(E q)) of the posteriors ``softmax(logits)``; logits (B, K, S, V), one posterior per codebook.

    H(q) is the mean over all tokens of the per-token entropy; H(E q) is the entropy of the posterior averaged
    over batch and segment, averaged over the K codebooks.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    sample = -(p * logp).sum(-1).mean()
    avg = p.mean(dim=(0, 2))  # (K, V)
    avg_ent = -(avg * avg.clamp_min(1e-12).log()).sum(-1).mean()
    return sample, avg_ent


class SoftVectorQuantizer(Quantizer):
    """Soft VQ with K codebooks over contiguous token segments (the published SoftVQ quantizer)."""

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        num_codebooks: int = 1,
        tau: float = 0.07,
        l2_norm: bool = True,
        entropy_weight: float = 1.0,
        entropy_tau: float | None = None,
        track_usage: bool = True,
    ) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.codebook_size = codebook_size
        self.dim = dim
        self.num_codebooks = num_codebooks
        self.tau = tau
        self.l2_norm = l2_norm
        self.entropy_weight = entropy_weight
        self.entropy_tau = entropy_tau
        self.embedding = nn.Parameter(torch.empty(num_codebooks, codebook_size, dim))
        with torch.no_grad():
            self.embedding.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.copy_(F.normalize(self.embedding, p=2, dim=-1))
        self.codebook_used: Tensor | None
        if track_usage:
            # -1 marks "no code recorded yet"; published files carry their own history here.
            self.register_buffer("codebook_used", torch.full((num_codebooks, USAGE_WINDOW), -1.0))
        else:
            self.codebook_used = None

    # ---------------------------------------------------------------------------------------------- pieces

    def codebook(self) -> Tensor:
        """(K, V, d): the codewords as used (L2-normalised when ``l2_norm``)."""
        return F.normalize(self.embedding, p=2, dim=-1) if self.l2_norm else self.embedding

    def segments(self, z: Tensor) -> Tensor:
        """z (B, L, d) -> (B, K, S, d), token ``k*S + s`` in segment k."""
        if z.dim() != 3 or z.shape[-1] != self.dim:
            raise ValueError(f"expected tokens (B, L, {self.dim}), got {tuple(z.shape)}")
        b, length, d = z.shape
        if length % self.num_codebooks:
            raise ValueError(f"{length} tokens are not divisible into {self.num_codebooks} codebook segments")
        return z.reshape(b, self.num_codebooks, length // self.num_codebooks, d)

    def scaled_logits(self, sim: Tensor, zs: Tensor) -> Tensor:
        """Posterior logits from similarities sim (B, K, S, V); zs (B, K, S, d) are the raw tokens."""
        return sim / self.tau

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (B, K, S) -> the hard codewords (B, L, d) (the tau -> 0 limit of ``quantized``)."""
        e = self.codebook()
        b, k, s = indices.shape
        codes = e[torch.arange(k, device=indices.device)[None, :, None], indices]  # (B, K, S, d)
        return codes.reshape(b, k * s, self.dim)

    # ---------------------------------------------------------------------------------------------- forward

    def forward(self, z: Tensor, compute_losses: bool = True) -> SoftQuantizerOutput:
        """z (B, L, d) -> quantized (B, L, d), indices (B, K, L/K), probs (B, L, V) (+ losses if asked)."""
        zs = self.segments(z)
        b, k, s, d = zs.shape
        zn = F.normalize(zs, p=2, dim=-1) if self.l2_norm else zs
        e = self.codebook()
        # As in the official code, the codebook receives gradients only through z_q, not through the logits.
        sim = torch.einsum("bksd,kvd->bksv", zn, e.detach())
        logits = self.scaled_logits(sim, zs)
        probs = F.softmax(logits, dim=-1)
        zq = torch.einsum("bksv,kvd->bksd", probs, e)
        indices = probs.argmax(dim=-1)
        if self.training and self.codebook_used is not None:
            self._record_usage(indices)
        out = SoftQuantizerOutput(
            quantized=zq.reshape(b, k * s, d),
            indices=indices,
            probs=probs.reshape(b, k * s, self.codebook_size),
        )
        if not compute_losses:
            return out
        sample, avg = entropy_terms(logits if self.entropy_tau is None else sim / self.entropy_tau)
        usage = {f"codebook{j}": hit_counts(indices[:, j], self.codebook_size) for j in range(k)}
        return SoftQuantizerOutput(
            quantized=out.quantized, indices=indices, probs=out.probs,
            losses={"entropy": self.entropy_weight * (sample - avg)}, usage=usage,
            sample_entropy=sample, avg_entropy=avg,
        )

    # ---------------------------------------------------------------------------------------------- usage

    @torch.no_grad()
    def _record_usage(self, indices: Tensor) -> None:
        buf = self.codebook_used
        assert buf is not None
        new = indices.transpose(0, 1).reshape(self.num_codebooks, -1).to(buf.dtype)[:, -USAGE_WINDOW:]
        buf.copy_(torch.cat([buf[:, new.shape[1]:], new], dim=1))

    @torch.no_grad()
    def codebook_usage(self) -> Tensor:
        """(K,) fraction of the V codes seen in the recorded training history (0 when none recorded)."""
        if self.codebook_used is None:
            raise RuntimeError("this quantizer does not track usage")
        out = [torch.unique(row[row >= 0]).numel() / self.codebook_size for row in self.codebook_used]
        return torch.tensor(out)


class GMMVectorQuantizer(SoftVectorQuantizer):
    """Soft VQ whose per-token posterior sharpness and mixture weights are learned (see the module doc)."""

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        num_codebooks: int = 1,
        tau: float = 0.07,
        l2_norm: bool = True,
        entropy_weight: float = 1.0,
        entropy_tau: float | None = None,
        track_usage: bool = True,
        max_log_scale: float = 4.0,
    ) -> None:
        super().__init__(codebook_size, dim, num_codebooks, tau, l2_norm, entropy_weight, entropy_tau, track_usage)
        self.max_log_scale = max_log_scale
        self.tau_head = nn.Linear(dim, 1)
        nn.init.zeros_(self.tau_head.weight)
        nn.init.zeros_(self.tau_head.bias)
        self.log_prior = nn.Parameter(torch.zeros(num_codebooks, codebook_size))

    def temperatures(self, zs: Tensor) -> Tensor:
        """zs (B, K, S, d) raw tokens -> per-token temperatures sigma^2 (B, K, S, 1)."""
        m = self.max_log_scale
        return self.tau * torch.exp(m * torch.tanh(self.tau_head(zs) / m))

    def scaled_logits(self, sim: Tensor, zs: Tensor) -> Tensor:
        log_pi = F.log_softmax(self.log_prior, dim=-1)[None, :, None, :]
        return sim / self.temperatures(zs) + log_pi


def _combine(outs: list[SoftQuantizerOutput], prefix: str, quantized: Tensor) -> SoftQuantizerOutput:
    """Stack the parts' indices / probs on a new trailing axis; average their losses and entropy terms."""

    def reduce(xs: list[Tensor]) -> Tensor:
        return torch.stack(xs).mean()

    indices = torch.stack([o.indices for o in outs], dim=-1)
    probs = torch.stack([o.probs for o in outs], dim=-2)  # type: ignore[misc]
    if not outs[0].losses:
        return SoftQuantizerOutput(quantized=quantized, indices=indices, probs=probs)
    usage: dict[str, Tensor] = {}
    for i, o in enumerate(outs):
        usage.update(prefixed(f"{prefix}{i}", o.usage))
    return SoftQuantizerOutput(
        quantized=quantized, indices=indices, probs=probs,
        losses={name: reduce([o.losses[name] for o in outs]) for name in outs[0].losses},
        usage=usage,
        sample_entropy=reduce([o.sample_entropy for o in outs]),  # type: ignore[misc]
        avg_entropy=reduce([o.avg_entropy for o in outs]),  # type: ignore[misc]
    )


class ProductSoftQuantizer(Quantizer):
    """G soft quantizers over G equal channel groups of the token (product quantization)."""

    def __init__(self, num_groups: int, dim: int, codebook_size: int, **soft_kwargs: object) -> None:
        super().__init__()
        if dim % num_groups:
            raise ValueError(f"token dim {dim} is not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.dim = dim
        self.codebook_size = codebook_size
        self.quantizers = nn.ModuleList(
            SoftVectorQuantizer(codebook_size, dim // num_groups, track_usage=False, **soft_kwargs)  # type: ignore[arg-type]
            for _ in range(num_groups)
        )

    def forward(self, z: Tensor, compute_losses: bool = True) -> SoftQuantizerOutput:
        """z (B, L, d) -> quantized (B, L, d), indices (B, K, L/K, G), probs (B, L, G, V)."""
        chunks = z.chunk(self.num_groups, dim=-1)
        outs = [q(c, compute_losses) for q, c in zip(self.quantizers, chunks, strict=True)]
        return _combine(outs, "group", torch.cat([o.quantized for o in outs], dim=-1))

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (B, K, S, G) -> hard codes (B, L, d)."""
        return torch.cat([q.indices_to_codes(indices[..., g]) for g, q in enumerate(self.quantizers)], dim=-1)


class ResidualSoftQuantizer(Quantizer):
    """R soft quantizers on successive residuals of the (L2-normalised) token (residual quantization)."""

    def __init__(
        self, num_levels: int, dim: int, codebook_size: int, l2_norm: bool = True, **soft_kwargs: object
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.dim = dim
        self.codebook_size = codebook_size
        self.l2_norm = l2_norm
        self.quantizers = nn.ModuleList(
            SoftVectorQuantizer(codebook_size, dim, l2_norm=l2_norm, track_usage=False, **soft_kwargs)  # type: ignore[arg-type]
            for _ in range(num_levels)
        )
        self.level_scale = nn.Parameter(torch.tensor([0.5**r for r in range(num_levels)]))

    def forward(self, z: Tensor, compute_losses: bool = True) -> SoftQuantizerOutput:
        """z (B, L, d) -> quantized (B, L, d), indices (B, K, L/K, R), probs (B, L, R, V)."""
        residual = F.normalize(z, p=2, dim=-1) if self.l2_norm else z
        total = torch.zeros_like(z)
        outs = []
        for r, q in enumerate(self.quantizers):
            o = q(residual, compute_losses)
            part = o.quantized * self.level_scale[r]
            total = total + part
            residual = residual - part
            outs.append(o)
        return _combine(outs, "level", total)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (B, K, S, R) -> hard codes (B, L, d) = sum_r level_scale[r] * codeword_r."""
        total = self.level_scale[0] * self.quantizers[0].indices_to_codes(indices[..., 0])
        for r in range(1, self.num_levels):
            total = total + self.level_scale[r] * self.quantizers[r].indices_to_codes(indices[..., r])
        return total


@dataclass(frozen=True)
class SoftQuantizerSettings:
    """The soft-quantizer fields that every SoftVQ-style tokenizer config carries (a base of those configs);
    :meth:`build_quantizer` makes the quantizer, :meth:`quantizer_problems` checks the fields."""

    codebook_size: int = 1024
    num_codebooks: int = 4
    tau: float = 0.07
    codebook_l2_norm: bool = True
    quantizer: str = "soft"
    num_groups: int = 1
    num_levels: int = 1
    entropy_weight: float = 1.0
    entropy_tau: float | None = None

    def quantizer_problems(self, num_tokens: int, token_dim: int) -> list[str]:
        problems = []
        if num_tokens % self.num_codebooks:
            problems.append(f"num_tokens {num_tokens} not divisible by num_codebooks {self.num_codebooks}")
        if self.quantizer not in KINDS:
            problems.append(f"quantizer {self.quantizer!r} not in {KINDS}")
        if self.quantizer == "product" and token_dim % self.num_groups:
            problems.append(f"token_dim {token_dim} not divisible by num_groups {self.num_groups}")
        return problems

    def build_quantizer(self, dim: int) -> Quantizer:
        return build_soft_quantizer(
            self.quantizer, codebook_size=self.codebook_size, dim=dim, num_codebooks=self.num_codebooks,
            tau=self.tau, l2_norm=self.codebook_l2_norm, entropy_weight=self.entropy_weight,
            entropy_tau=self.entropy_tau, num_groups=self.num_groups, num_levels=self.num_levels)


def build_soft_quantizer(
    kind: str,
    *,
    codebook_size: int,
    dim: int,
    num_codebooks: int,
    tau: float,
    l2_norm: bool = True,
    entropy_weight: float = 1.0,
    entropy_tau: float | None = None,
    num_groups: int = 1,
    num_levels: int = 1,
) -> Quantizer:
    """The quantizer of ``kind`` in :data:`KINDS` with the given settings."""
    common = dict(num_codebooks=num_codebooks, tau=tau, entropy_weight=entropy_weight, entropy_tau=entropy_tau)
    if kind == "soft":
        return SoftVectorQuantizer(codebook_size, dim, l2_norm=l2_norm, **common)  # type: ignore[arg-type]
    if kind == "gmm":
        return GMMVectorQuantizer(codebook_size, dim, l2_norm=l2_norm, **common)  # type: ignore[arg-type]
    if kind == "product":
        return ProductSoftQuantizer(num_groups, dim, codebook_size, l2_norm=l2_norm, **common)
    if kind == "residual":
        return ResidualSoftQuantizer(num_levels, dim, codebook_size, l2_norm=l2_norm, **common)
    raise ValueError(f"unknown quantizer kind {kind!r}; known: {KINDS}")
