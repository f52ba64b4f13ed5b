"""MAR sampling as a step function, and MAR's training loss.

:class:`MARSampler` follows :mod:`models.sampling.base`: ``init_row`` draws the row's generation order from
its own ``torch.Generator`` (seeded with ``request.seed``); ``step(model, rows)`` runs one MAR iteration for
every row, each at its own iteration of its own schedule, with

* one transformer forward (:meth:`models.mar.MAR.backbone`) over all rows plus an unconditional copy
  (null label, same tokens and mask) of the rows whose guidance is on; rows with different numbers of known
  tokens share the forward (the encoder pads them and masks the padding out of attention);
* the head's respaced DDPM loop for all newly revealed tokens of all rows together: one head forward
  (:meth:`models.mar.MAR.head`) per diffusion step, with the unconditional copies appended.

``model`` is anything with those two methods (the module, or a runtime wrapper around exported graphs).

Recipe (``../shared/reference/FORMATS-MAR-XQV.md`` 1.5-1.6): at iteration s of n, the masked count becomes
``m = floor(L cos(pi/2 (s+1)/n))`` clamped to [1, remaining - 1]; positions ``order[:m]`` stay masked and the
rest of the previously masked ones are revealed (all of them at the last iteration). Guidance scale:
``linear`` ``1 + (cfg - 1)(L - m)/L`` or ``constant`` cfg; it mixes only the eps half, ``u + s (c - u)``, and
the variance half comes from the conditional rows. The head samples with the cosine schedule respaced to
``diffusion_steps`` (learned-range variance, no clipping unless the config's ``clip_x0`` > 0, the model
called with the original step index),
temperature scaling only the per-step noise. Guidance is on when ``cfg_scale > 1`` and the fraction of
tokens still masked before the iteration (1 at the start, the MAR analogue of "time") lies in
``[guidance_low, guidance_high]``; the default [0, 1] is the published behaviour.

Row randomness: ``init_row`` draws ``order = randperm(L)``; each iteration then draws one (S, k, C) float32
block (S = diffusion steps, k = tokens revealed by that row): block 0 is the head's initial noise, block
i + 1 the noise of its i-th step. Only the row's own generator is used, so a row's tokens do not depend on
its batch. The published code draws orders with numpy and noise for the whole batch, so its samples are
reproduced in distribution, not bit for bit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from models.mar import CFG_SCHEDULES
from models.sampling.base import Row, SampleRequest, StepStats
from models.sampling.diffusion import GaussianDiffusion, create_diffusion, ddpm_update
from models.sampling.guidance import append_unconditional, guidance_active, plan_step


class MARModel(Protocol):
    """What the sampler calls (floats in the sampler's ``dtype``, float32 by default). ``backbone``: tokens
    (N, L, C), mask (N, L) bool (True = unknown), labels (N,) int64 (``null_class`` = unconditional) -> z
    (N, L, D). ``head``: x (M, C), t (M,) original diffusion steps, z (M, D) -> (M, 2C) [eps | v]."""

    def backbone(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def head(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class MARSampleRequest(SampleRequest):
    """A :class:`SampleRequest` with MAR's own knobs; ``None`` takes the sampler's default (the model
    config's). ``steps`` is the number of MAR iterations (``num_iter``)."""

    sampler: str = "mar"
    cfg_schedule: str | None = None
    temperature: float | None = None
    diffusion_steps: int | None = None


@dataclass
class MARStepStats(StepStats):
    """``forwards`` / ``model_rows`` / ``uncond_rows`` count the transformer; the head adds its forwards,
    the rows it evaluated over all of them, and the tokens revealed (conditional ones)."""

    head_forwards: int = 0
    head_rows: int = 0
    tokens: int = 0


def masked_count(num_tokens: int, step: int, num_iter: int, remaining: int) -> int:
    """Tokens still masked after iteration ``step`` (0-based) of ``num_iter``, clamped to [1, remaining - 1]
    as in the published code (the clamped value also drives the linear guidance schedule)."""
    m = math.floor(num_tokens * math.cos(math.pi / 2.0 * (step + 1) / num_iter))
    return max(1, min(remaining - 1, m))


def cfg_at(cfg: float, schedule: str, num_tokens: int, masked_next: int) -> float:
    """Guidance scale of an iteration: ``linear`` 1 + (cfg - 1)(L - m)/L, ``constant`` cfg."""
    if schedule == "linear":
        return 1.0 + (cfg - 1.0) * (num_tokens - masked_next) / num_tokens
    if schedule == "constant":
        return cfg
    raise ValueError(f"cfg_schedule {schedule!r} is not one of {CFG_SCHEDULES}")


@dataclass
class _Plan:
    """One row's part of an iteration."""

    positions: torch.Tensor  # (k,) int64 positions revealed now, increasing
    mask_after: torch.Tensor  # (L,) bool
    cfg: float
    guided: bool
    diffusion: GaussianDiffusion
    noise: torch.Tensor  # (S, k, C) float32, already times the temperature from block 1 on


class MARSampler:
    """Step sampler for MAR rows (see the module docstring). Defaults come from the model config through
    :meth:`from_config`; a :class:`MARSampleRequest` may override them per row. ``dtype`` is what the model
    is fed and the head's DDPM arithmetic runs in (float32, as published; float64 for exactness tests: the
    first DDPM steps amplify eps round-off by up to ~1/sqrt(alpha_bar) ~ 1e4, so float32 rows agree with
    their batched selves to ~1e-4, float64 rows to ~1e-12)."""

    name = "mar"

    def __init__(self, *, null_class: int = 1000, cfg_schedule: str = "linear", temperature: float = 1.0,
                 diffusion_steps: int = 100, noise_schedule: str = "cosine", num_train_timesteps: int = 1000,
                 clip_x0: float = 0.0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule {cfg_schedule!r} is not one of {CFG_SCHEDULES}")
        self.null_class = null_class
        self.cfg_schedule = cfg_schedule
        self.temperature = temperature
        self.diffusion_steps = diffusion_steps
        self.noise_schedule = noise_schedule
        self.num_train_timesteps = num_train_timesteps
        self.clip_x0 = clip_x0
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_config(cls, config: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                    ) -> MARSampler:
        """From a :class:`models.mar.MARConfig` (its null class and sampling defaults)."""
        return cls(null_class=config.num_classes, cfg_schedule=config.cfg_schedule,
                   temperature=config.temperature,
                   diffusion_steps=config.diffusion_steps, noise_schedule=config.noise_schedule,
                   num_train_timesteps=config.num_train_timesteps, clip_x0=config.clip_x0, device=device,
                   dtype=dtype)

    # ---------------------------------------------------------------------------------- rows

    def init_row(self, request: SampleRequest, shape: tuple[int, int]) -> Row:
        """A fully masked row of zeros (L, C) float64; its order ``randperm(L)`` from its own generator."""
        L, _ = shape
        schedule = getattr(request, "cfg_schedule", None) or self.cfg_schedule
        temperature = getattr(request, "temperature", None)
        temperature = self.temperature if temperature is None else float(temperature)
        steps = getattr(request, "diffusion_steps", None) or self.diffusion_steps
        if request.steps < 1:
            raise ValueError("steps (MAR iterations) must be >= 1")
        if schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule {schedule!r} is not one of {CFG_SCHEDULES}")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 2 <= steps <= self.num_train_timesteps:  # one step has no posterior variance (as in ADM)
            raise ValueError(f"diffusion_steps must be in [2, {self.num_train_timesteps}]")
        g = torch.Generator(device="cpu").manual_seed(request.seed)
        order = torch.randperm(L, generator=g)
        state = {
            "order": order.to(self.device),
            "mask": torch.ones(L, dtype=torch.bool, device=self.device),
            "cfg_schedule": schedule,
            "temperature": temperature,
            "diffusion": create_diffusion(str(steps), self.noise_schedule, self.num_train_timesteps),
        }
        x = torch.zeros(tuple(shape), dtype=torch.float64, device=self.device)
        return Row(request, x, g, total=request.steps, state=state)

    def result(self, row: Row) -> torch.Tensor:
        """(L, C) float64 normalised latents of a finished row."""
        return row.x

    def _plan(self, row: Row) -> _Plan:
        L, C = row.x.shape
        mask: torch.Tensor = row.state["mask"]
        remaining = int(mask.sum())
        m = masked_count(L, row.step, row.total, remaining)
        mask_after = torch.zeros_like(mask)  # the last iteration reveals everything left
        if row.step < row.total - 1:
            mask_after[row.state["order"][:m]] = True
        positions = (mask & ~mask_after).nonzero().squeeze(1)
        req = row.request
        cfg = cfg_at(req.cfg_scale, row.state["cfg_schedule"], L, m)
        guided = guidance_active(req.cfg_scale, req.guidance_low, req.guidance_high, remaining / L)
        diff: GaussianDiffusion = row.state["diffusion"]
        noise = torch.randn((diff.num_steps, positions.numel(), C), generator=row.generator, dtype=torch.float32)
        noise[1:] *= row.state["temperature"]
        return _Plan(positions, mask_after, cfg, guided, diff, noise.to(row.x.device))

    # ---------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, model: MARModel, rows: Sequence[Row]) -> MARStepStats:
        """Advance every row by one MAR iteration (see the module docstring); returns what it cost."""
        stats = MARStepStats(rows=len(rows))
        if not rows:
            return stats
        plans, gidx = plan_step(rows, self._plan)
        dev, n = rows[0].x.device, len(rows)

        # 1. the transformer: all rows, then unconditional copies of the guided ones
        labels, tokens, masks = append_unconditional(
            gidx, self.null_class, torch.tensor([r.request.class_id for r in rows], dtype=torch.long, device=dev),
            torch.stack([r.x for r in rows]).to(self.dtype), torch.stack([r.state["mask"] for r in rows]))
        z = model.backbone(tokens, masks, labels)
        stats.forwards, stats.model_rows, stats.uncond_rows = 1, tokens.shape[0], len(gidx)

        # 2. the head, over every revealed token of every row
        sampled = self._sample_tokens(model, z, plans, n, gidx, stats)

        # 3. write back
        start = 0
        for r, p in zip(rows, plans, strict=True):
            k = p.positions.numel()
            if k:
                r.x[p.positions] = sampled[start:start + k].to(r.x.dtype)
            start += k
            r.state["mask"] = p.mask_after
            r.step += 1
        return stats

    def _sample_tokens(self, model: MARModel, z: torch.Tensor, plans: list[_Plan], n: int, gidx: list[int],
                       stats: MARStepStats) -> torch.Tensor:
        """Respaced DDPM for all revealed tokens of all rows: returns (M, C) in ``dtype``, rows in order.

        z (n + G, L, D): conditional rows, then the unconditional copies of the guided rows ``gidx``. Tokens
        of rows with fewer diffusion steps drop out of the batch once their loop has ended."""
        dev = z.device
        counts = [p.positions.numel() for p in plans]
        M = stats.tokens = sum(counts)
        if M == 0:
            return torch.zeros(0, 0, device=dev)
        C = plans[0].noise.shape[-1]
        slot = {i: n + j for j, i in enumerate(gidx)}  # row -> its unconditional row in z

        def per_token(values: list[Any], dtype: torch.dtype) -> torch.Tensor:
            return torch.repeat_interleave(torch.tensor(values, dtype=dtype, device=dev),
                                           torch.tensor(counts, device=dev))

        pos = torch.cat([p.positions for p in plans])
        zc = z[per_token(list(range(n)), torch.long), pos]  # (M, D)
        zu = z[per_token([slot.get(i, i) for i in range(n)], torch.long), pos]  # (M, D), used where guided
        guided = per_token([p.guided for p in plans], torch.bool)
        scale = per_token([p.cfg for p in plans], self.dtype)[:, None]
        steps = per_token([p.diffusion.num_steps for p in plans], torch.long)
        offsets = [0, *itertools.accumulate(counts)]
        # respacing -> (its diffusion, (M,) bool: its tokens)
        groups: dict[int, tuple[GaussianDiffusion, torch.Tensor]] = {}
        noise = torch.zeros(int(steps.max()), M, C, device=dev, dtype=self.dtype)
        for i, p in enumerate(plans):
            empty = torch.zeros(M, dtype=torch.bool, device=dev)
            sel = groups.setdefault(id(p.diffusion), (p.diffusion, empty))[1]
            sel[offsets[i]:offsets[i + 1]] = True
            noise[:p.diffusion.num_steps, offsets[i]:offsets[i + 1]] = p.noise
        S = noise.shape[0]
        tmaps = {key: torch.tensor(d.timestep_map, dtype=self.dtype, device=dev)
                 for key, (d, _) in groups.items()}
        x = noise[0].clone()  # the initial noise is not scaled by the temperature

        for it in range(S):
            k = steps - 1 - it  # respaced step of each token (< 0: its loop has ended)
            act = (k >= 0).nonzero().squeeze(1)
            g = act[guided[act]]
            t = torch.zeros(M, dtype=self.dtype, device=dev)
            for key, (_, sel) in groups.items():
                on = sel & (k >= 0)
                t[on] = tmaps[key][k[on]]
            out = model.head(torch.cat([x[act], x[g]]), torch.cat([t[act], t[g]]),
                             torch.cat([zc[act], zu[g]])).to(self.dtype)
            stats.head_forwards += 1
            stats.head_rows += act.numel() + g.numel()
            A = act.numel()
            eps, var = out[:A, :C].clone(), out[:A, C:]
            if g.numel():
                u, gin = out[A:, :C], guided[act]
                eps[gin] = u + scale[g] * (eps[gin] - u)
            step_noise = noise[it + 1] if it + 1 < S else torch.zeros_like(x)
            x_new = x.clone()
            for d, sel in groups.values():
                on_a = sel[act]
                if bool(on_a.any()):
                    tok = act[on_a]
                    x_new[tok] = ddpm_update(d, "ddpm", x[tok][:, None], k[tok], eps[on_a][:, None],
                                         var[on_a][:, None], step_noise[tok][:, None],
                                         clip_x0=self.clip_x0).squeeze(1)
            x = x_new
        return x


# ------------------------------------------------------------------------------------------------ loss


@dataclass
class MARLoss:
    """``loss`` the scalar to minimise (mean over masked tokens of ``mse + vb``); ``mse`` and ``vb`` its parts
    (detached means over the same tokens); ``mask_ratio`` the sampled ratio."""

    loss: torch.Tensor
    mse: torch.Tensor
    vb: torch.Tensor
    mask_ratio: float


def sample_mask_ratio(minimum: float = 0.7, generator: torch.Generator | None = None) -> float:
    """MAR's mask ratio: a normal(1.0, 0.25) truncated to [minimum, 1.0] (inverse-CDF sampling)."""
    mu, sd = 1.0, 0.25
    lo = torch.special.ndtr(torch.tensor((minimum - mu) / sd, dtype=torch.float64))
    hi = torch.special.ndtr(torch.tensor(0.0, dtype=torch.float64))
    u = lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64)
    return float(min(1.0, max(minimum, mu + sd * float(torch.special.ndtri(u)))))


def random_mask(batch: int, num_tokens: int, ratio: float, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, L) bool: ``ceil(L * ratio)`` positions per row, the first ones of a random order, masked."""
    orders = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)
    n_mask = math.ceil(num_tokens * ratio)
    mask = torch.zeros(batch, num_tokens, dtype=torch.bool)
    mask.scatter_(1, orders[:, :n_mask], True)
    return mask.to(device)


def _normal_kl(m1: torch.Tensor, lv1: torch.Tensor, m2: torch.Tensor, lv2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))


def _discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """ADM's decoder NLL (nats) of x under a Gaussian discretised into 255 bins on [-1, 1]."""
    def cdf(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    c = x - mean
    inv = torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv * (c + 1.0 / 255)), cdf(inv * (c - 1.0 / 255))
    log_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return -torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_one_minus, log_delta))


def mar_loss(model: Any, tokens: torch.Tensor, labels: torch.Tensor, *, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> MARLoss:
    """MAR's training loss on normalised latents ``tokens`` (B, L, C) with labels (B,) int64.

    A mask ratio from :func:`sample_mask_ratio` (or the given ``mask`` (B, L) bool) hides tokens; the model
    (in training mode it drops labels itself) gives the conditions; each masked token is repeated
    ``diffusion_batch_mul`` times with its own step t ~ U{0..T-1} and noise; the head's loss per token is the
    eps MSE plus the learned-variance VLB term (bits per dim; the decoder NLL at t = 0), ADM's hybrid loss
    with the mean frozen inside the VLB, averaged over the masked tokens.
    """
    cfg = model.config
    B, L, C = tokens.shape
    dev = tokens.device
    ratio = sample_mask_ratio(cfg.mask_ratio_min, generator) if mask is None else float(mask.float().mean())
    if mask is None:
        mask = random_mask(B, L, ratio, generator, dev)
    z = model(tokens, mask, labels)
    sel = mask.reshape(-1).repeat(cfg.diffusion_batch_mul)
    x0 = tokens.reshape(B * L, C).repeat(cfg.diffusion_batch_mul, 1)[sel]
    cond = z.reshape(B * L, -1).repeat(cfg.diffusion_batch_mul, 1)[sel]
    diff = create_diffusion("", cfg.noise_schedule, cfg.num_train_timesteps)
    t = torch.randint(0, cfg.num_train_timesteps, (x0.shape[0],), generator=generator).to(dev)
    noise = torch.randn(x0.shape, generator=generator).to(dev, x0.dtype)

    def co(name: str) -> torch.Tensor:
        return diff.coef(name, t, ndim=2)

    x_t = torch.sqrt(co("alphas_cumprod")) * x0 + torch.sqrt(1 - co("alphas_cumprod")) * noise
    out = model.head(x_t, t.float(), cond)
    eps, v = out[:, :C], out[:, C:]
    mse = ((noise - eps) ** 2).mean(dim=1)
    # VLB with the mean frozen: learned-range variance around the detached eps
    frac = (v + 1) / 2
    log_var = frac * co("log_betas") + (1 - frac) * co("posterior_log_variance_clipped")
    pred_x0 = co("sqrt_recip_alphas_cumprod") * x_t - co("sqrt_recipm1_alphas_cumprod") * eps.detach()
    mean = co("posterior_mean_coef1") * pred_x0 + co("posterior_mean_coef2") * x_t
    true_mean = co("posterior_mean_coef1") * x0 + co("posterior_mean_coef2") * x_t
    kl = _normal_kl(true_mean, co("posterior_log_variance_clipped"), mean, log_var)
    kl = kl.mean(dim=1) / math.log(2.0)
    nll = _discretized_gaussian_nll(x0, mean, 0.5 * log_var).mean(dim=1) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    per_token = mse + vb
    return MARLoss(per_token.mean(), mse.detach().mean(), vb.detach().mean(), ratio)


__all__ = ["CFG_SCHEDULES", "MARLoss", "MARModel", "MARSampleRequest", "MARSampler", "MARStepStats", "cfg_at",
           "mar_loss", "masked_count", "random_mask", "sample_mask_ratio"]
