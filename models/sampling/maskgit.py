"""MaskGIT decoding as a step function (:mod:`models.sampling.base`).

A row holds its codes ``x`` (L,) int64, with ``mask_token_id`` (= codebook size) at positions still masked;
it starts fully masked. One ``step(model, rows)`` runs one MaskGIT iteration for every row, each at its own
iteration of its own schedule, with a single forward of ``model(codes (N, L) int64, labels (N,) int64) ->
logits (N, L, V)`` over all rows plus unconditional copies (null label, same codes) of the rows whose
guidance is on. Per row, at iteration s of n:

1. logits of the guided rows become ``u + w (c - u)``, with ``w`` the ``linear`` ramp ``1 + (cfg - 1)(L - m)/L``
   or the ``constant`` cfg (as MAR); guidance is on when ``cfg_scale > 1`` and the masked fraction before the
   iteration (1 at the start) lies in ``[guidance_low, guidance_high]``;
2. every masked position draws a code from ``softmax(logits / temperature)`` (inverse CDF of a uniform);
3. its confidence is ``log p(code) + choice_temperature * (1 - (s + 1)/n) * gumbel`` (annealed Gumbel noise);
4. the ``m = floor(L cos(pi/2 (s+1)/n))`` least confident of them (clamped to [1, remaining - 1], as
   :func:`models.sampling.mar.masked_count`) stay masked, the others keep their code; the last iteration
   reveals everything.

Randomness: each iteration draws one (2, L) float64 block from the row's own ``torch.Generator`` (seeded with
``request.seed``): row 0 the uniforms of step 2, row 1 those of the Gumbel noise. Rows never read each other,
so a row's codes do not depend on its batch (up to float round-off of batched matmuls in the logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from models.maskgit import CFG_SCHEDULES
from models.sampling.base import Row, SampleRequest, StepStats
from models.sampling.guidance import append_unconditional, guidance_active, plan_step
from models.sampling.mar import cfg_at, masked_count


class MaskGITModel(Protocol):
    """codes (N, L) int64 in [0, V] (V = masked), labels (N,) int64 (``null_class`` = unconditional) ->
    logits (N, L, V), any float dtype."""

    def __call__(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class MaskGITSampleRequest(SampleRequest):
    """A :class:`SampleRequest` with MaskGIT's own knobs; ``None`` takes the sampler's default (the model
    config's). ``steps`` is the number of MaskGIT iterations."""

    sampler: str = "maskgit"
    cfg_schedule: str | None = None
    temperature: float | None = None
    choice_temperature: float | None = None


@dataclass
class _Plan:
    remaining: int  # masked positions before the iteration
    masked_after: int  # masked positions after it (0 at the last iteration)
    cfg: float
    guided: bool
    temperature: float
    noise_scale: float  # choice_temperature * (1 - (s + 1) / n)


class MaskGITSampler:
    """Step sampler for MaskGIT rows (module docstring). Defaults come from a
    :class:`models.maskgit.MaskGITConfig` through :meth:`from_config`; a :class:`MaskGITSampleRequest` may
    override them per row."""

    name = "maskgit"

    def __init__(self, *, codebook_size: int, null_class: int = 1000, cfg_schedule: str = "linear",
                 temperature: float = 1.0, choice_temperature: float = 4.5,
                 device: torch.device | str = "cpu") -> None:
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule {cfg_schedule!r} is not one of {CFG_SCHEDULES}")
        self.codebook_size = codebook_size
        self.mask_token_id = codebook_size
        self.null_class = null_class
        self.cfg_schedule = cfg_schedule
        self.temperature = temperature
        self.choice_temperature = choice_temperature
        self.device = torch.device(device)

    @classmethod
    def from_config(cls, config: Any, device: torch.device | str = "cpu") -> MaskGITSampler:
        """From a :class:`models.maskgit.MaskGITConfig` (codebook, null class and sampling defaults)."""
        return cls(codebook_size=config.codebook_size, null_class=config.num_classes,
                   cfg_schedule=config.cfg_schedule, temperature=config.temperature,
                   choice_temperature=config.choice_temperature, device=device)

    # ---------------------------------------------------------------------------------- rows

    def init_row(self, request: SampleRequest, shape: tuple[int, ...]) -> Row:
        """A fully masked row: ``x`` (L,) int64 of ``mask_token_id``; ``shape`` is (L,) or (L, C)."""
        L = int(shape[0])
        schedule = getattr(request, "cfg_schedule", None) or self.cfg_schedule
        temperature = getattr(request, "temperature", None)
        temperature = self.temperature if temperature is None else float(temperature)
        choice = getattr(request, "choice_temperature", None)
        choice = self.choice_temperature if choice is None else float(choice)
        if request.steps < 1:
            raise ValueError("steps (MaskGIT iterations) must be >= 1")
        if schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule {schedule!r} is not one of {CFG_SCHEDULES}")
        if temperature <= 0 or choice < 0:
            raise ValueError("temperature must be > 0 and choice_temperature >= 0")
        g = torch.Generator(device="cpu").manual_seed(request.seed)
        x = torch.full((L,), self.mask_token_id, dtype=torch.long, device=self.device)
        state = {"cfg_schedule": schedule, "temperature": temperature, "choice_temperature": choice}
        return Row(request, x, g, total=request.steps, state=state)

    def result(self, row: Row) -> torch.Tensor:
        """(L,) int64 codes of a finished row, all in [0, codebook_size)."""
        return row.x

    def _plan(self, row: Row) -> _Plan:
        L = row.x.shape[0]
        remaining = int((row.x == self.mask_token_id).sum())
        m = masked_count(L, row.step, row.total, remaining)
        last = row.step >= row.total - 1
        req = row.request
        frac = (row.step + 1) / row.total
        return _Plan(
            remaining=remaining,
            masked_after=0 if last else m,
            cfg=cfg_at(req.cfg_scale, row.state["cfg_schedule"], L, m),
            guided=guidance_active(req.cfg_scale, req.guidance_low, req.guidance_high, remaining / L),
            temperature=row.state["temperature"],
            noise_scale=row.state["choice_temperature"] * (1.0 - frac),
        )

    # ---------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, model: MaskGITModel, rows: Sequence[Row]) -> StepStats:
        """Advance every row by one MaskGIT iteration (module docstring); returns what it cost."""
        stats = StepStats(rows=len(rows))
        if not rows:
            return stats
        plans, gidx = plan_step(rows, self._plan)
        dev, n = rows[0].x.device, len(rows)

        codes = torch.stack([r.x for r in rows])  # (N, L)
        labels, codes_in = append_unconditional(
            gidx, self.null_class, torch.tensor([r.request.class_id for r in rows], dtype=torch.long, device=dev),
            codes)
        logits = model(codes_in, labels)
        stats.forwards, stats.model_rows, stats.uncond_rows = 1, logits.shape[0], len(gidx)
        logits = logits.double()
        cond = logits[:n]
        if gidx:
            w = torch.tensor([plans[i].cfg for i in gidx], dtype=torch.float64, device=dev)[:, None, None]
            u, gi = logits[n:], torch.tensor(gidx, dtype=torch.long, device=dev)
            cond = cond.clone()
            cond[gi] = u + w * (cond[gi] - u)

        temp = torch.tensor([p.temperature for p in plans], dtype=torch.float64, device=dev)[:, None, None]
        probs = torch.softmax(cond / temp, dim=-1)  # (N, L, V)
        draws = torch.stack([torch.rand(2, r.x.shape[0], generator=r.generator, dtype=torch.float64)
                             for r in rows]).to(dev)  # (N, 2, L)
        cdf = probs.cumsum(dim=-1)
        target = (draws[:, 0] * cdf[..., -1])[..., None]  # (N, L, 1)
        sampled = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=self.codebook_size - 1)
        unknown = codes == self.mask_token_id
        sampled = torch.where(unknown, sampled, codes)

        chosen = probs.gather(-1, sampled[..., None]).squeeze(-1).log()
        gumbel = -torch.log(-torch.log(draws[:, 1].clamp(1e-300, 1.0 - 1e-16)))
        scale = torch.tensor([p.noise_scale for p in plans], dtype=torch.float64, device=dev)[:, None]
        confidence = torch.where(unknown, chosen + scale * gumbel, torch.inf)
        rank = confidence.argsort(dim=1, stable=True).argsort(dim=1)
        keep = torch.tensor([p.masked_after for p in plans], dtype=torch.long, device=dev)[:, None]
        new = torch.where(rank < keep, self.mask_token_id, sampled)
        for i, r in enumerate(rows):
            r.x = new[i].clone()
            r.step += 1
        return stats


__all__ = ["MaskGITModel", "MaskGITSampleRequest", "MaskGITSampler"]
