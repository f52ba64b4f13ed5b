"""SiT samplers: Euler / Heun ODE and Euler-Maruyama SDE, time running from t = 1 (noise) to t = 0 (data).

Two forms with the same numbers:

* functional ``euler_sampler`` / ``euler_maruyama_sampler``: the official SoftVQ / REPA ``samplers.py``
  recipe for a whole batch (state in float64, model called in float32, ``torch.linspace`` float64 grids,
  guidance ``v_u + s (v_c - v_u)`` when ``cfg_scale > 1`` and ``guidance_low <= t_cur <= guidance_high``,
  Heun's second call guided by the decision taken at ``t_cur``, SDE noise drawn before the model call and
  guidance applied to the drift, last SDE step deterministic);
* :class:`FlowSampler`, the step API of :mod:`models.sampling.base` for the server: every row has its own
  step count, class, scale, interval, path type and ``torch.Generator``.

Row randomness (``FlowSampler``): ``init_row`` seeds a ``torch.Generator`` on the sampler's device with
``request.seed`` and draws the initial noise (L, C) in float32 (as the official ``torch.randn(n, L, C)``),
stored as float64; the SDE then draws one (L, C) float64 eps per step, except on the last step. So a row with
seed s equals ``euler_maruyama_sampler(latents, generator=g)`` for a batch of one, with ``g`` seeded s on the
same device and ``latents = torch.randn(1, L, C, generator=g)``.

Device: rows, their generators and all step arithmetic stay on the sampler's ``device``; a step sends one
(4, N) float64 block of per-row numbers (t_cur, t_next, cfg scale, class) to it and reads nothing back. On
the CPU the numbers are those of the functional samplers (the tests compare them). A CUDA generator's stream
differs from a CPU one's, so on CUDA a seed gives another sample than on the CPU: the same seed on the same
device gives the same result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from models.sampling.base import ModelFn, Row, SampleRequest, StepStats, to_device
from models.sampling.guidance import call_model, guidance_active, guided_forward

PATH_TYPES = ("linear", "cosine")  # interpolants of the SDE sampler (SiT's path_type)
FLOW_SAMPLERS = ("euler", "heun", "sde")
SDE_LAST_T = 0.04


# ------------------------------------------------------------------------------------------- numerics


@lru_cache(maxsize=64)
def ode_timesteps(num_steps: int) -> torch.Tensor:
    """(num_steps + 1,) float64: ``torch.linspace(1, 0, num_steps + 1)``."""
    return torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)


@lru_cache(maxsize=64)
def sde_timesteps(num_steps: int) -> torch.Tensor:
    """(num_steps + 1,) float64: ``linspace(1, 0.04, num_steps)`` then 0 (the deterministic last step)."""
    return torch.cat([torch.linspace(1.0, SDE_LAST_T, num_steps, dtype=torch.float64),
                      torch.tensor([0.0], dtype=torch.float64)])


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path_type: str) -> torch.Tensor:
    """Score of the interpolant ``x_t = alpha_t x_0 + sigma_t eps`` from the velocity, all float64.

    v, x (N, L, C); t (N,). linear: alpha = 1 - t, sigma = t; cosine: alpha = cos(pi t / 2),
    sigma = sin(pi t / 2). ``r = alpha / alpha'``, ``var = sigma^2 - r sigma' sigma``, score = (r v - x) / var.
    """
    t = t.view(t.shape[0], *([1] * (x.dim() - 1)))
    if path_type == "linear":  # the coefficients are per row: (N, 1, 1) (the official code broadcasts them to x)
        alpha_t, d_alpha_t = 1 - t, torch.ones_like(t) * -1
        sigma_t, d_sigma_t = t, torch.ones_like(t)
    elif path_type == "cosine":
        alpha_t = torch.cos(t * np.pi / 2)
        sigma_t = torch.sin(t * np.pi / 2)
        d_alpha_t = -np.pi / 2 * torch.sin(t * np.pi / 2)
        d_sigma_t = np.pi / 2 * torch.cos(t * np.pi / 2)
    else:
        raise ValueError(f"path_type {path_type!r} is not one of {PATH_TYPES}")
    ratio = alpha_t / d_alpha_t
    var = sigma_t**2 - ratio * d_sigma_t * sigma_t
    return (ratio * v).sub_(x).div_(var)  # (ratio v - x) / var in one buffer: the same operations


def _velocity(model_fn: ModelFn, x: torch.Tensor, t: float, y: torch.Tensor, guide: bool, cfg_scale: float,
              null_class: int, dtype: torch.dtype, path_type: str | None = None) -> torch.Tensor:
    """The (guided) velocity, or with ``path_type`` the (guided) SDE drift, of the whole batch: float64."""
    n, c = x.shape[0], x.shape[-1]
    xin = torch.cat([x, x]) if guide else x
    yin = torch.cat([y, torch.full_like(y, null_class)]) if guide else y
    tin = torch.ones(xin.shape[0], dtype=torch.float64, device=x.device) * t
    out = call_model(model_fn, xin.to(dtype), tin.to(dtype), yin).to(torch.float64)[..., :c]
    if path_type is not None:
        w = 2 * t
        out = out - 0.5 * w * score_from_velocity(out, xin, tin, path_type)
    if guide:
        cond, uncond = out[:n], out[n:]
        out = uncond + cfg_scale * (cond - uncond)
    return out


# ----------------------------------------------------------------------------------------- functional


@torch.no_grad()
def euler_sampler(model_fn: ModelFn, latents: torch.Tensor, y: torch.Tensor, num_steps: int = 20,
                  heun: bool = False, cfg_scale: float = 1.0, guidance_low: float = 0.0,
                  guidance_high: float = 1.0, path_type: str = "linear", *, null_class: int = 1000,
                  model_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Euler (or Heun) ODE from t = 1 to 0 over ``num_steps`` uniform steps.

    latents (B, L, C) N(0, I) noise, y (B,) int64 labels. The model is called in ``model_dtype`` (default:
    the latents' dtype, float32 for float64 latents); ``path_type`` is accepted for signature parity with
    the official sampler and ignored. Returns (B, L, C) float64.
    """
    dtype = model_dtype or (torch.float32 if latents.dtype == torch.float64 else latents.dtype)
    t_steps = ode_timesteps(num_steps).tolist()
    x_next = latents.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        guide = guidance_active(cfg_scale, guidance_low, guidance_high, t_cur)
        d_cur = _velocity(model_fn, x_cur, t_cur, y, guide, cfg_scale, null_class, dtype)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            d_prime = _velocity(model_fn, x_next, t_next, y, guide, cfg_scale, null_class, dtype)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@torch.no_grad()
def euler_maruyama_sampler(model_fn: ModelFn, latents: torch.Tensor, y: torch.Tensor, num_steps: int = 20,
                           heun: bool = False, cfg_scale: float = 1.0, guidance_low: float = 0.0,
                           guidance_high: float = 1.0, path_type: str = "linear", *, null_class: int = 1000,
                           generator: torch.Generator | None = None,
                           model_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Euler-Maruyama SDE with diffusion w(t) = 2t on ``linspace(1, 0.04, num_steps)`` then a deterministic
    step to 0.

    Each stochastic step draws eps (B, L, C) float64 from ``generator`` (the global CPU generator when
    None, like the official ``torch.randn_like``) *before* the model call. Guidance acts on the drift
    ``v - w/2 * score``. ``heun`` is accepted for signature parity and ignored. Returns (B, L, C) float64.
    """
    dtype = model_dtype or (torch.float32 if latents.dtype == torch.float64 else latents.dtype)
    t_steps = sde_timesteps(num_steps).tolist()
    x = latents.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        dt = t_next - t_cur
        guide = guidance_active(cfg_scale, guidance_low, guidance_high, t_cur)
        last = i == num_steps - 1
        if not last:
            eps = torch.randn(x.shape, dtype=torch.float64, generator=generator, device=x.device)
        d_cur = _velocity(model_fn, x, t_cur, y, guide, cfg_scale, null_class, dtype, path_type)
        if last:
            x = x + dt * d_cur
        else:
            w = torch.tensor(2 * t_cur, dtype=torch.float64)
            x = x + d_cur * dt + torch.sqrt(w) * (eps * math.sqrt(abs(dt)))
    return x


# ------------------------------------------------------------------------------------------- step API


class FlowSampler:
    """Step sampler for SiT rows: ``name`` is ``"euler"``, ``"heun"`` or ``"sde"``.

    ``step`` advances every row by one step of its own schedule; Euler and SDE run one batched forward,
    Heun two (the second only over rows not on their last step). Unconditional copies are appended only
    for rows with ``cfg_scale > 1`` whose ``t_cur`` lies in their interval.
    """

    def __init__(self, name: str = "sde", *, null_class: int = 1000, model_dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if name not in FLOW_SAMPLERS:
            raise ValueError(f"unknown flow sampler {name!r}; expected one of {FLOW_SAMPLERS}")
        self.name = name
        self.null_class = null_class
        self.model_dtype = model_dtype
        self.device = torch.device(device)

    def init_row(self, request: SampleRequest, shape: tuple[int, int]) -> Row:
        """Noise (L, C) from the row's own generator on ``self.device``, seeded with ``request.seed`` (drawn in
        float32, stored float64 there). The schedule stays a host list: guidance and last-step decisions read
        it without touching the device."""
        if request.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.name == "sde" and request.path_type not in PATH_TYPES:
            raise ValueError(f"path_type {request.path_type!r} is not one of {PATH_TYPES}")
        g = torch.Generator(device=self.device).manual_seed(request.seed)
        x = torch.randn(tuple(shape), generator=g, dtype=torch.float32, device=self.device).to(torch.float64)
        times = sde_timesteps(request.steps) if self.name == "sde" else ode_timesteps(request.steps)
        return Row(request, x, g, total=request.steps, state={"t": times.tolist()})

    def result(self, row: Row) -> torch.Tensor:
        return row.x

    @torch.no_grad()
    def step(self, model_fn: ModelFn, rows: Sequence[Row]) -> StepStats:
        stats = StepStats(rows=len(rows))
        if not rows:
            return stats
        if any(r.done for r in rows):
            raise ValueError("step() got a finished row")
        n = len(rows)
        dev = rows[0].x.device
        t_cur = [r.state["t"][r.step] for r in rows]
        t_next = [r.state["t"][r.step + 1] for r in rows]
        guide = [guidance_active(r.request.cfg_scale, r.request.guidance_low, r.request.guidance_high, t)
                 for r, t in zip(rows, t_cur, strict=True)]
        paths = [r.request.path_type for r in rows]
        # one host -> device copy of the per-row numbers; class ids are exact in float64
        p = to_device([t_cur, t_next, [r.request.cfg_scale for r in rows],
                       [float(r.request.class_id) for r in rows]], torch.float64, dev)
        tc, scale, y = p[0], p[2], p[3].long()
        dt = (p[1] - tc).view(-1, 1, 1)
        x = torch.stack([r.x for r in rows])

        # the arithmetic below works in place in buffers the step owns (d, eps): the official operations in
        # the official order, without a fresh (N, L, C) float64 tensor per operation
        if self.name == "sde":
            eps = self._eps(rows, x)
            d = self._drift(model_fn, x, tc, y, guide, scale, paths, stats)
            x_new = d.mul_(dt).add_(x)  # x + d * dt: the last step's update (the official x + dt * d)
            if eps is not None:  # + sqrt(w) * (eps * sqrt|dt|), with eps = 0 on rows taking their last step
                w = (2 * tc).view(-1, 1, 1)
                x_new.add_(eps.mul_(torch.sqrt(torch.abs(dt))).mul_(torch.sqrt(w)))
        elif self.name == "euler":
            x_new = self._drift(model_fn, x, tc, y, guide, scale, paths, stats).mul_(dt).add_(x)  # x + dt * d
        else:
            d = self._drift(model_fn, x, tc, y, guide, scale, paths, stats)
            x_new = x + dt * d
            if self.name == "heun":
                idx = [i for i, r in enumerate(rows) if r.step < r.total - 1]
                if len(idx) == n:
                    d2 = self._drift(model_fn, x_new, p[1], y, guide, scale, paths, stats)
                    x_new = x + dt * (0.5 * d + 0.5 * d2)
                elif idx:
                    sel = to_device(idx, torch.long, dev)
                    d2 = self._drift(model_fn, x_new[sel], p[1][sel], y[sel], [guide[i] for i in idx],
                                     scale[sel], [paths[i] for i in idx], stats)
                    x_new[sel] = x[sel] + dt[sel] * (0.5 * d[sel] + 0.5 * d2)
        for i, r in enumerate(rows):
            r.x = x_new[i]
            r.step += 1
        return stats

    @staticmethod
    def _eps(rows: Sequence[Row], like: torch.Tensor) -> torch.Tensor | None:
        """(N, L, C) float64: each row's eps drawn from its own generator into its slice (what
        ``torch.randn(shape, generator=g)`` draws), zeros on rows taking their last step; None if all are."""
        last = [r.step >= r.total - 1 for r in rows]
        if all(last):
            return None
        eps = torch.zeros_like(like) if any(last) else torch.empty_like(like)
        for i, (r, is_last) in enumerate(zip(rows, last, strict=True)):
            if not is_last:
                eps[i].normal_(generator=r.generator)
        return eps

    def _drift(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guide: list[bool],
               scale: torch.Tensor, paths: list[str], stats: StepStats) -> torch.Tensor:
        """Guided velocity (ODE) or guided drift ``v - t * score`` (SDE) of rows x (N, L, C) float64: a new
        buffer, which the caller may overwrite."""
        c = x.shape[-1]
        out = guided_forward(model_fn, x.to(self.model_dtype), t.to(self.model_dtype), y, guide,
                             self.null_class, stats)
        cond = out.cond[..., :c].to(torch.float64, copy=True)
        uncond = out.uncond[..., :c].to(torch.float64, copy=True)
        if self.name == "sde":
            cond = self._sde_drift(cond, x, t, paths)
            if uncond.shape[0] == x.shape[0]:  # every row guided: the copies are x itself
                uncond = self._sde_drift(uncond, x, t, paths)
            elif uncond.shape[0]:
                gi = out.index
                uncond = self._sde_drift(uncond, x[gi], t[gi], [p for p, g in zip(paths, guide, strict=True) if g])
        return out.combine(cond, uncond, scale, inplace=True)

    @staticmethod
    def _sde_drift(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, paths: list[str]) -> torch.Tensor:
        """``v - 0.5 w score`` (w = 2t); with one path for the whole batch (the usual case) in place in v."""
        w = (2 * t).view(-1, 1, 1)
        kinds = set(paths)
        if len(kinds) == 1:
            return v.sub_(score_from_velocity(v, x, t, paths[0]).mul_(0.5 * w))
        d = torch.empty_like(v)
        for p in kinds:
            idx = to_device([i for i, q in enumerate(paths) if q == p], torch.long, v.device)
            d[idx] = v[idx] - 0.5 * w[idx] * score_from_velocity(v[idx], x[idx], t[idx], p)
        return d
