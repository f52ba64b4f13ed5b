"""VAR sampling as a step function: one step = one scale of next-scale prediction for every row.

:class:`VARSampler` follows :mod:`models.sampling.base`. A row holds its codes ``x`` (G, L) int64 (``-1``
until sampled), its own ``torch.Generator`` (seeded with ``request.seed``), the f_hat it has built so far,
the input map of its next scale and its KV cache (conditional, plus an unconditional one while guidance may
still be needed). ``step(model, rows)`` advances every row by one scale:

* rows are grouped by their scale index; each group runs **one** KV-cached forward
  (:meth:`models.var.VAR.forward_scale`) over its rows plus unconditional copies (null class, same input map)
  of its guided rows. Rows of one scale have caches of one length, so their caches are concatenated along
  the batch axis for the forward and split back afterwards; rows at different scales cannot share a forward
  (different lengths and scale positions), so a call with k distinct scales runs k forwards. A scheduler gets
  full batches by letting new rows join at scale 0 together (a group that starts together stays together);
  a row joining later simply forms its own group until it finishes.
* guidance, per row: ``t = cfg * si / (S - 1)`` and ``logits = (1 + t) cond - t uncond`` (the published
  ramp; ``cfg_scale`` is the published ``cfg``, 0 turns guidance off). ``t`` is applied only at scales whose
  progress ``si / (S - 1)`` lies in ``[guidance_low, guidance_high]`` (default [0, 1]: published); the
  unconditional copy runs from scale 0 (its cache must cover every earlier scale) up to the last scale that
  still applies guidance, and is dropped after it.
* sampling, per row and per branch (separate softmaxes over each branch's V logits): top-k (keep logits >=
  the k-th largest), then top-p (drop the smallest-probability tail whose mass is <= 1 - top_p, always
  keeping the most likely code), then inverse-CDF sampling with one float64 uniform per position drawn from
  the row's generator (a (G, p*p) block per scale, drawn on the CPU), so a row's codes do not depend on its
  batch or device (up to float round-off of batched matmuls). The published code draws a multinomial for
  the whole batch from one generator, so its samples are reproduced in distribution, not bit for bit.
* the sampled codes are embedded (un-normalised codebook rows) and added to the row's f_hat through the
  tokenizer's Phi convolutions; the next scale's input is f_hat area-downsampled
  (:meth:`models.imagefolder.ImageFolderModel.next_scale_input`).

``result(row)`` gives the codes (G, L) for the tokenizer's ``decode``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from models.sampling.base import Row, SampleRequest, StepStats

KV = tuple[torch.Tensor, torch.Tensor]


class VARModel(Protocol):
    """What the sampler calls: ``forward_scale(si, labels (N,), token_map (N, l, G*C) | None, past | None)``
    returning an object with ``logits`` (N, l, G*V) and ``cache`` (one (k, v) per layer, batch-first)."""

    def forward_scale(self, si: int, labels: torch.Tensor, token_map: torch.Tensor | None,
                      past: list[KV] | None) -> Any: ...


class VARTokenizer(Protocol):
    """The tokenizer side: ``next_scale_input(si, f_hat (N, G*C, s, s), codes (N, G, p*p))`` ->
    (f_hat, next input map (N, G*C, p', p'))."""

    def next_scale_input(self, si: int, f_hat: torch.Tensor, codes: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class VARSampleRequest(SampleRequest):
    """A :class:`SampleRequest` with VAR's own knobs; ``None`` takes the sampler's default (the model
    config's). ``steps`` must equal the number of scales (or be 0, meaning all of them)."""

    sampler: str = "var"
    top_k: int | None = None
    top_p: float | None = None


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits (..., V) -> a copy with the codes outside the top-k / top-p set at ``-inf`` (0 = off)."""
    out = logits.clone()
    V = out.shape[-1]
    if 0 < top_k < V:
        kth = out.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, -math.inf)
    if 0.0 < top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1.0 - top_p)
        remove[..., -1:] = False
        out = out.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    return out


def sample_codes(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: logits (..., V) (``-inf`` = excluded), uniforms (...) float64 in [0, 1)
    -> codes (...) int64 with P(code) = softmax(logits)."""
    cdf = logits.double().softmax(dim=-1).cumsum(dim=-1)
    total = cdf[..., -1:]
    # strictly below the total mass, so the first index whose cdf exceeds it has a positive probability
    u = torch.minimum(uniforms.to(cdf.device, torch.float64).unsqueeze(-1) * total,
                      torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


class VARSampler:
    """Step sampler for VAR rows (module docstring). ``tokenizer`` provides ``next_scale_input``; defaults
    come from the generator config through :meth:`from_config`. ``dtype`` is what the model is fed (float32
    as published; float64 for exactness tests)."""

    name = "var"

    def __init__(self, tokenizer: VARTokenizer, *, scales: Sequence[int], num_branches: int, codebook_size: int,
                 code_dim: int, null_class: int = 1000, top_k: int = 0, top_p: float = 0.0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if code_dim % num_branches:
            raise ValueError(f"code_dim {code_dim} does not split over {num_branches} branches")
        self.tokenizer = tokenizer
        self.scales = tuple(int(p) for p in scales)
        self.num_branches = num_branches
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.null_class = null_class
        self.top_k = top_k
        self.top_p = top_p
        self.device = torch.device(device)
        self.dtype = dtype
        self.bounds = [0]
        for p in self.scales:
            self.bounds.append(self.bounds[-1] + p * p)

    @classmethod
    def from_config(cls, config: Any, tokenizer: VARTokenizer, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> VARSampler:
        """From a :class:`models.var.VARConfig` (scales, branches, null class, top-k / top-p defaults)."""
        return cls(tokenizer, scales=config.scales, num_branches=config.num_branches,
                   codebook_size=config.codebook_size, code_dim=config.code_dim, null_class=config.null_class,
                   top_k=config.top_k, top_p=config.top_p, device=device, dtype=dtype)

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def num_codes(self) -> int:
        return self.bounds[-1]

    def progress(self, si: int) -> float:
        """si / (S - 1): 0 at the first scale, 1 at the last (0 when there is one scale)."""
        return si / (self.num_scales - 1) if self.num_scales > 1 else 0.0

    # ---------------------------------------------------------------------------------- rows

    def init_row(self, request: SampleRequest, shape: tuple[int, int]) -> Row:
        """A row of codes (G, L) int64 all ``-1``; its generator seeded with ``request.seed``."""
        G, L = shape
        if (G, L) != (self.num_branches, self.num_codes):
            raise ValueError(f"VAR rows are ({self.num_branches}, {self.num_codes}), got {tuple(shape)}")
        if request.steps not in (0, self.num_scales):
            raise ValueError(f"VAR runs its {self.num_scales} scales; steps must be {self.num_scales} (or 0)")
        top_k = getattr(request, "top_k", None)
        top_p = getattr(request, "top_p", None)
        top_k = self.top_k if top_k is None else int(top_k)
        top_p = self.top_p if top_p is None else float(top_p)
        if top_k < 0 or not 0.0 <= top_p <= 1.0:
            raise ValueError("top_k must be >= 0 and top_p in [0, 1]")
        if not 0 <= request.class_id <= self.null_class:
            raise ValueError(f"class_id must lie in [0, {self.null_class}]")
        guided = [si for si in range(1, self.num_scales)
                  if request.cfg_scale != 0 and request.guidance_low <= self.progress(si) <= request.guidance_high]
        side = self.scales[-1]
        state = {
            "top_k": top_k,
            "top_p": top_p,
            "last_guided": max(guided) if guided else -1,  # uncond copies run at scales 0..last_guided
            "f_hat": torch.zeros(self.code_dim, side, side, device=self.device, dtype=self.dtype),
            "next": None,  # (p*p, G*C) input of the next scale
            "cache": None,  # per layer (k, v), each (1, H, positions, hd)
            "uncond_cache": None,
        }
        x = torch.full((G, L), -1, dtype=torch.long, device=self.device)
        g = torch.Generator(device="cpu").manual_seed(request.seed)
        return Row(request, x, g, total=self.num_scales, state=state)

    def result(self, row: Row) -> torch.Tensor:
        """Codes (G, L) int64 of a finished row."""
        return row.x

    # ---------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, model: VARModel, rows: Sequence[Row]) -> StepStats:
        """Advance every row by one scale: one forward per distinct scale index among ``rows``."""
        stats = StepStats(rows=len(rows))
        if any(r.done for r in rows):
            raise ValueError("step() got a finished row")
        groups: dict[int, list[Row]] = defaultdict(list)
        for r in rows:
            groups[r.step].append(r)
        for si in sorted(groups):
            self._step_scale(model, si, groups[si], stats)
        return stats

    def _step_scale(self, model: VARModel, si: int, rows: list[Row], stats: StepStats) -> None:
        n = len(rows)
        dev = self.device
        uncond = [i for i, r in enumerate(rows) if si <= r.state["last_guided"]]
        labels = [r.request.class_id for r in rows] + [self.null_class] * len(uncond)
        label_t = torch.tensor(labels, dtype=torch.long, device=dev)
        token_map = past = None
        if si > 0:
            maps = [r.state["next"] for r in rows]
            token_map = torch.stack(maps + [maps[i] for i in uncond])
            caches = [r.state["cache"] for r in rows] + [rows[i].state["uncond_cache"] for i in uncond]
            past = [(torch.cat([c[layer][0] for c in caches]), torch.cat([c[layer][1] for c in caches]))
                    for layer in range(len(caches[0]))]
        out = model.forward_scale(si, label_t, token_map, past)
        stats.forwards += 1
        stats.model_rows += len(labels)
        stats.uncond_rows += len(uncond)

        # split the cache back into rows
        for j, r in enumerate(rows):
            r.state["cache"] = [(k[j:j + 1], v[j:j + 1]) for k, v in out.cache]
        for u, i in enumerate(uncond):
            keep = si < rows[i].state["last_guided"]
            rows[i].state["uncond_cache"] = [(k[n + u:n + u + 1], v[n + u:n + u + 1]) for k, v in out.cache] \
                if keep else None

        # guidance, filtering and sampling, per row and per branch
        logits = out.logits  # (n + U, l, G*V)
        slot = {i: n + u for u, i in enumerate(uncond)}
        G, V = self.num_branches, self.codebook_size
        codes = []
        for i, r in enumerate(rows):
            lg = logits[i]
            req = r.request
            if i in slot and req.guidance_low <= self.progress(si) <= req.guidance_high:
                t = req.cfg_scale * self.progress(si)
                lg = (1 + t) * lg - t * logits[slot[i]]
            lg = lg.view(lg.shape[0], G, V).transpose(0, 1)  # (G, l, V): separate softmax per branch
            lg = filter_top_k_top_p(lg, r.state["top_k"], r.state["top_p"])
            u = torch.rand((G, lg.shape[1]), generator=r.generator, dtype=torch.float64)
            codes.append(sample_codes(lg, u))
        code_t = torch.stack(codes)  # (n, G, l)

        # write codes, grow f_hat, prepare the next scale's input
        f_hat = torch.stack([r.state["f_hat"] for r in rows])
        f_hat, nxt = self.tokenizer.next_scale_input(si, f_hat, code_t)
        nxt = nxt.flatten(2).transpose(1, 2).to(self.dtype)  # (n, p'*p', G*C)
        b, e = self.bounds[si], self.bounds[si + 1]
        for i, r in enumerate(rows):
            r.x[:, b:e] = code_t[i]
            r.state["f_hat"] = f_hat[i]
            r.step += 1
            r.state["next"] = nxt[i] if not r.done else None
            if r.done:
                r.state["cache"] = r.state["uncond_cache"] = None


__all__ = ["VARModel", "VARSampleRequest", "VARSampler", "VARTokenizer", "filter_top_k_top_p", "sample_codes"]
