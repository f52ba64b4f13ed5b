"""DiT Gaussian diffusion (ADM / DiT ``gaussian_diffusion.py`` numerics): beta schedules over 1000 training
steps, timestep respacing, learned-range variance, DDPM ancestral sampling (``clip_denoised=False``) and
DDIM (eta 0), with guidance on the eps half of the output.

Numerics follow the official code: schedules and respaced coefficient tables in numpy float64, each
coefficient gathered at the current step and cast to float32, all sampling arithmetic in float32 (the
latents' dtype), the model called with the *original* (un-respaced) integer step as a float32 tensor. The
1-D token layout puts the [eps | variance] halves on the last axis (B, L, 2C).

Two forms with the same numbers: functional ``ddpm_sampler`` / ``ddim_sampler`` (the official
``p_sample_loop(model.forward_with_cfg, ...)`` over ``[z, z]`` / ``[y, null]``), and :class:`DiffusionSampler`
(the step API of :mod:`models.sampling.base`).

Randomness: with guidance (``cfg_scale > 1``) the official loop runs on the doubled batch, so every step
draws noise for 2B rows and keeps the first B. Both forms do the same: the functional sampler draws
(2B, L, C) (or (B, L, C) without guidance) float32 per step, DDIM included; a row draws (2, L, C) or (L, C)
from its own generator and keeps the first (L, C). The initial noise is (L, C) float32 drawn first. A row
seeded s therefore equals the functional sampler for a batch of one with ``latents = torch.randn(1, L, C,
generator=g)`` and ``generator=g``, g seeded s (on the sampler's device).

Device: :class:`DiffusionSampler` keeps rows, their generators and the coefficient tables of every respacing
it meets on its ``device`` (:class:`StackedTables`: one gather serves rows of different step counts); a step
sends one small block of per-row numbers there and reads nothing back. On the CPU the numbers are the
functional samplers'; on CUDA a seed draws another stream than on the CPU (same seed, same device, same result).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from models.sampling.base import ModelFn, Row, SampleRequest, StepStats, to_device
from models.sampling.guidance import call_model, guidance_active, guided_forward

NUM_TRAIN_TIMESTEPS = 1000
DIFFUSION_SAMPLERS = ("ddpm", "ddim")
NOISE_SCHEDULES = ("cosine", "linear")  # training beta schedules (DiT's noise_schedule)


# ------------------------------------------------------------------------------------------ schedules


def beta_schedule(name: str, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """(T,) float64 betas. ``linear``: linspace(1e-4, 0.02) scaled by 1000 / T; ``cosine`` (ADM; also
    called ``squaredcos_cap_v2``): from alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2, capped at 0.999."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name in ("cosine", "squaredcos_cap_v2"):
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                 for i in range(num_timesteps)]
        return np.array(betas)
    raise ValueError(f"unknown noise schedule {name!r}; expected cosine or linear")


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The original steps kept by respacing: ``"250"`` keeps 250 evenly strided steps (rounded), ``"10,15"``
    10 from the first half and 15 from the second, ``"ddim50"`` a fixed integer stride giving 50 steps."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


@dataclass(frozen=True)
class GaussianDiffusion:
    """Coefficient tables (T,) float64 of a (respaced) diffusion; ``timestep_map[k]`` is the original step
    of respaced step k, the value the model sees."""

    betas: np.ndarray
    timestep_map: tuple[int, ...]
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    def __post_init__(self) -> None:
        b = np.asarray(self.betas, dtype=np.float64)
        alphas = 1.0 - b
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "posterior_log_variance_clipped": (np.log(np.append(post_var[1], post_var[1:]))
                                               if len(post_var) > 1 else np.array([])),
            "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "log_betas": np.log(b),
        }
        object.__setattr__(self, "betas", b)
        for k, v in tables.items():
            object.__setattr__(self, k, v)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def coef(self, name: str, k: torch.Tensor, ndim: int = 3) -> torch.Tensor:
        """Table ``name`` at respaced steps k (N,) as float32 (N, 1, ..., 1), like ADM's
        ``_extract_into_tensor`` (gather in float64, then ``.float()``)."""
        arr = torch.from_numpy(getattr(self, name)).to(k.device)
        return arr[k].float().view(-1, *([1] * (ndim - 1)))


@lru_cache(maxsize=32)
def create_diffusion(timestep_respacing: str = "", noise_schedule: str = "cosine",
                     diffusion_steps: int = NUM_TRAIN_TIMESTEPS) -> GaussianDiffusion:
    """The respaced diffusion of DiT's ``create_diffusion(str(steps), noise_schedule=...)``: betas
    recomputed as ``1 - alpha_bar_k / alpha_bar_prev`` over the kept steps."""
    base = GaussianDiffusion(beta_schedule(noise_schedule, diffusion_steps), tuple(range(diffusion_steps)),
                             diffusion_steps)
    use = space_timesteps(diffusion_steps, timestep_respacing or [diffusion_steps])
    last, betas, tmap = 1.0, [], []
    for i, ac in enumerate(base.alphas_cumprod):
        if i in use:
            betas.append(1 - ac / last)
            last = ac
            tmap.append(i)
    return GaussianDiffusion(np.array(betas), tuple(tmap), diffusion_steps)


class StackedTables:
    """The coefficient tables of every respacing a sampler has met, concatenated on one device: respacing
    ``d`` holds places ``offset(d) .. offset(d) + d.num_steps - 1``, so rows with different step counts read
    their coefficients with one gather (:meth:`at`). Tables are built on first use and again after a new
    respacing joins (a new step count: rare); the values are the float64 tables themselves."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._offsets: dict[int, int] = {}  # id(diffusion) -> offset; ``_diffs`` keeps them alive
        self._diffs: list[GaussianDiffusion] = []
        self._tables: dict[str, torch.Tensor] = {}
        self._size = 0

    def offset(self, diff: GaussianDiffusion) -> int:
        off = self._offsets.get(id(diff))
        if off is None:
            off = self._offsets[id(diff)] = self._size
            self._diffs.append(diff)
            self._size += diff.num_steps
            self._tables.clear()
        return off

    def table(self, name: str) -> torch.Tensor:
        """(sum of num_steps,) float64 on the device."""
        t = self._tables.get(name)
        if t is None:
            arr = np.concatenate([getattr(d, name) for d in self._diffs])
            t = torch.from_numpy(arr)
            t = self._tables[name] = t if self.device.type == "cpu" else t.to(self.device)
        return t

    def at(self, places: torch.Tensor) -> _TablesAt:
        """The ``coef`` source of :func:`ddpm_update` for rows at ``places`` (N,) int64 (offset + step)."""
        return _TablesAt(self, places)


@dataclass(frozen=True)
class _TablesAt:
    tables: StackedTables
    places: torch.Tensor

    def coef(self, name: str, k: torch.Tensor, ndim: int = 3) -> torch.Tensor:
        """:meth:`GaussianDiffusion.coef` for these rows (``k``, their respaced steps, is what ``places``
        already encodes): gathered in float64, then ``.float()``."""
        return self.tables.table(name)[self.places].float().view(-1, *([1] * (ndim - 1)))


# ----------------------------------------------------------------------------------------- the update


def _check_steps(num_steps: int) -> None:
    # one respaced step has no posterior variance table (the official code fails there too)
    if not 2 <= num_steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"DiT sampling needs 2 to {NUM_TRAIN_TIMESTEPS} steps, got {num_steps}")


def ddpm_update(diff: GaussianDiffusion | _TablesAt, method: str, x: torch.Tensor, k: torch.Tensor, eps: torch.Tensor,
            var_values: torch.Tensor, noise: torch.Tensor | None, eta: float = 0.0,
            clip_x0: float = 0.0) -> torch.Tensor:
    """One reverse step from respaced steps k (N,) of x (N, L, C) float32, given the (guided) eps and the
    variance interpolation values (N, L, C). ``noise`` None means "no noise term" (the last step).
    ``clip_x0`` > 0 clamps the predicted clean sample to [-clip_x0, clip_x0] (0: off, the published DiT/MAR
    behaviour)."""
    c = diff.coef
    pred_x0 = c("sqrt_recip_alphas_cumprod", k) * x - c("sqrt_recipm1_alphas_cumprod", k) * eps
    if clip_x0 > 0:
        pred_x0 = pred_x0.clamp(-clip_x0, clip_x0)
    nonzero = (k != 0).float().view(-1, 1, 1)
    if method == "ddpm":
        min_log = c("posterior_log_variance_clipped", k)
        max_log = c("log_betas", k)
        frac = (var_values + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        mean = c("posterior_mean_coef1", k) * pred_x0 + c("posterior_mean_coef2", k) * x
        if noise is None:
            return mean
        return mean + nonzero * torch.exp(0.5 * log_var) * noise
    if method == "ddim":
        eps = (c("sqrt_recip_alphas_cumprod", k) * x - pred_x0) / c("sqrt_recipm1_alphas_cumprod", k)
        ab = c("alphas_cumprod", k)
        ab_prev = c("alphas_cumprod_prev", k)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        mean = pred_x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
        if noise is None:
            return mean
        return mean + nonzero * sigma * noise
    raise ValueError(f"unknown diffusion method {method!r}")


# ----------------------------------------------------------------------------------------- functional


@torch.no_grad()
def _diffusion_sample(method: str, model_fn: ModelFn, latents: torch.Tensor, y: torch.Tensor, num_steps: int,
                      cfg_scale: float, guidance_low: float, guidance_high: float, noise_schedule: str,
                      null_class: int, generator: torch.Generator | None, eta: float) -> torch.Tensor:
    _check_steps(num_steps)
    diff = create_diffusion(str(num_steps), noise_schedule)
    x = latents
    n, c = x.shape[0], x.shape[-1]
    doubled = cfg_scale > 1.0
    for k in reversed(range(diff.num_steps)):
        t_model = diff.timestep_map[k]
        guide = guidance_active(cfg_scale, guidance_low, guidance_high, t_model / diff.num_train_timesteps)
        xin = torch.cat([x, x]) if guide else x
        yin = torch.cat([y, torch.full_like(y, null_class)]) if guide else y
        tin = torch.full((xin.shape[0],), float(t_model), dtype=torch.float32, device=x.device)
        out = call_model(model_fn, xin, tin, yin)
        eps, var_values = out[:n, :, :c], out[:n, :, c:]
        if guide:
            u = out[n:, :, :c]
            eps = u + cfg_scale * (eps - u)
        shape = (2 * n if doubled else n, *x.shape[1:])
        noise = torch.randn(shape, dtype=x.dtype, generator=generator, device=x.device)[:n]
        kk = torch.full((n,), k, dtype=torch.long, device=x.device)
        x = ddpm_update(diff, method, x, kk, eps, var_values, noise, eta)
    return x


def ddpm_sampler(model_fn: ModelFn, latents: torch.Tensor, y: torch.Tensor, num_steps: int = 250,
                 cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0, *,
                 noise_schedule: str = "cosine", null_class: int = 1000,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """DDPM ancestral sampling (learned-range variance, no clipping) over ``num_steps`` respaced steps.

    latents (B, L, C) float32 noise, y (B,) int64. Guidance ``u + s (c - u)`` on the eps half when
    ``cfg_scale > 1`` and ``t / 1000`` lies in [guidance_low, guidance_high] (the official run: [0, 1]);
    the variance half comes from the conditional rows. Returns (B, L, C) in the latents' dtype.
    """
    return _diffusion_sample("ddpm", model_fn, latents, y, num_steps, cfg_scale, guidance_low, guidance_high,
                             noise_schedule, null_class, generator, 0.0)


def ddim_sampler(model_fn: ModelFn, latents: torch.Tensor, y: torch.Tensor, num_steps: int = 250,
                 cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0, *,
                 noise_schedule: str = "cosine", null_class: int = 1000, eta: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM over ``num_steps`` respaced steps (eta 0: deterministic; noise is still drawn each step, as in
    the official loop, so the generator advances identically). Same arguments as :func:`ddpm_sampler`."""
    return _diffusion_sample("ddim", model_fn, latents, y, num_steps, cfg_scale, guidance_low, guidance_high,
                             noise_schedule, null_class, generator, eta)


# ------------------------------------------------------------------------------------------- step API


class DiffusionSampler:
    """Step sampler for DiT rows: ``name`` is ``"ddpm"`` or ``"ddim"`` (eta 0). One batched forward per
    step; rows may have different step counts (each its own respacing), classes, scales and intervals."""

    def __init__(self, name: str = "ddpm", *, noise_schedule: str = "cosine", null_class: int = 1000,
                 device: torch.device | str = "cpu") -> None:
        if name not in DIFFUSION_SAMPLERS:
            raise ValueError(f"unknown diffusion sampler {name!r}; expected one of {DIFFUSION_SAMPLERS}")
        beta_schedule(noise_schedule, 2)  # validates the name
        self.name = name
        self.noise_schedule = noise_schedule
        self.null_class = null_class
        self.device = torch.device(device)
        self.tables = StackedTables(self.device)

    def init_row(self, request: SampleRequest, shape: tuple[int, int]) -> Row:
        """Noise (L, C) float32 from the row's own generator on ``self.device``, seeded with ``request.seed``,
        stored as float64 (the arithmetic stays float32, so the values remain float32-exact)."""
        _check_steps(request.steps)
        g = torch.Generator(device=self.device).manual_seed(request.seed)
        x = torch.randn(tuple(shape), generator=g, dtype=torch.float32, device=self.device).to(torch.float64)
        diff = create_diffusion(str(request.steps), self.noise_schedule)
        return Row(request, x, g, total=request.steps, state={"diffusion": diff})

    def result(self, row: Row) -> torch.Tensor:
        return row.x

    @torch.no_grad()
    def step(self, model_fn: ModelFn, rows: Sequence[Row]) -> StepStats:
        stats = StepStats(rows=len(rows))
        if not rows:
            return stats
        if any(r.done for r in rows):
            raise ValueError("step() got a finished row")
        dev = rows[0].x.device
        ks = [r.total - 1 - r.step for r in rows]
        diffs = [r.state["diffusion"] for r in rows]
        t_model = [d.timestep_map[k] for d, k in zip(diffs, ks, strict=True)]
        guide = [guidance_active(r.request.cfg_scale, r.request.guidance_low, r.request.guidance_high,
                                 t / d.num_train_timesteps)
                 for r, d, t in zip(rows, diffs, t_model, strict=True)]
        places = [self.tables.offset(d) + k for d, k in zip(diffs, ks, strict=True)]
        # one host -> device copy of the per-row numbers (all exact in float64)
        p = to_device([t_model, [r.request.cfg_scale for r in rows], [float(r.request.class_id) for r in rows],
                       ks, places], torch.float64, dev)
        t, scale, y, k = p[0].float(), p[1].float(), p[2].long(), p[3].long()
        noise = self._noise(rows, ks, rows[0].x)
        x = torch.stack([r.x for r in rows]).float()
        c = x.shape[-1]
        out = guided_forward(model_fn, x, t, y, guide, self.null_class, stats)
        eps = out.combine(out.cond[..., :c], out.uncond[..., :c], scale)
        var_values = out.cond[..., c:]
        # every row at once: each reads its own respacing's coefficients (the arithmetic is elementwise, so
        # batching rows of different step counts changes no value)
        x_new = ddpm_update(self.tables.at(p[4].long()), self.name, x, k, eps, var_values, noise)
        x_new = x_new.to(torch.float64)
        for i, r in enumerate(rows):
            r.x = x_new[i]
            r.step += 1
        return stats

    @staticmethod
    def _noise(rows: Sequence[Row], ks: list[int], like: torch.Tensor) -> torch.Tensor | None:
        """(N, L, C) float32, each row's noise for respaced step k from its own generator: the first (L, C) of a
        (2, L, C) draw when the row uses guidance (the official doubled batch), else an (L, C) draw; zeros on
        the last step (k = 0), where the official noise is multiplied by zero; None when every row is there.
        Drawn in place into one (N, 2, L, C) buffer (what ``torch.randn((2, L, C), generator=g)`` draws)."""
        if all(k == 0 for k in ks):
            return None
        pairs = 2 if any(r.request.cfg_scale > 1.0 for r in rows) else 1
        shape = (len(rows), pairs, *like.shape)
        buf = (torch.zeros if 0 in ks else torch.empty)(shape, dtype=torch.float32, device=like.device)
        for i, (r, k) in enumerate(zip(rows, ks, strict=True)):
            if k != 0:
                (buf[i] if r.request.cfg_scale > 1.0 else buf[i, 0]).normal_(generator=r.generator)
        return buf[:, 0]
