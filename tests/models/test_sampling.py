"""Samplers: official-recipe numerics, step API == functional API, per-row determinism, guidance packing."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from models.registry import create_model
from models.sampling import (
    SampleRequest,
    create_diffusion,
    ddim_sampler,
    ddpm_sampler,
    euler_maruyama_sampler,
    euler_sampler,
    get_sampler,
    run_to_completion,
    score_from_velocity,
)
from models.sampling.diffusion import beta_schedule, space_timesteps
from models.sampling.flow import ode_timesteps, sde_timesteps

L, C = 64, 32


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="module")
def sit() -> torch.nn.Module:
    return randomize(create_model("sit-tiny-64x32"), seed=0)


@pytest.fixture(scope="module")
def dit() -> torch.nn.Module:
    return randomize(create_model("dit-tiny-64x32"), seed=1)


class Counter:
    """model_fn wrapper recording the batch of every call and checking the unconditional packing."""

    def __init__(self, model: torch.nn.Module, null: int = 1000) -> None:
        self.model, self.null, self.calls = model, null, []

    def __call__(self, x, t, y):
        assert x.dtype == torch.float32 and t.dtype == torch.float32 and y.dtype == torch.long
        n_unc = int((y == self.null).sum())
        # uncond copies come after all conditional rows
        assert bool((y[: len(y) - n_unc] != self.null).all())
        self.calls.append((len(y), n_unc))
        return self.model(x, t, y)

    @property
    def uncond_rows(self) -> int:
        return sum(u for _, u in self.calls)


def first_noise(seed: int, n: int = 1) -> tuple[torch.Tensor, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, C, generator=g), g


def request(name: str, **kw) -> SampleRequest:
    base = {"class_id": 207, "seed": 11, "steps": 8, "cfg_scale": 2.5, "guidance_low": 0.0, "guidance_high": 0.7,
            "sampler": name}
    base.update(kw)
    return SampleRequest(**base)


# ------------------------------------------------------------------------------------------ numerics


def test_official_time_grids() -> None:
    assert sde_timesteps(4).tolist() == [1.0, 0.6799999999999999, 0.36, 0.04, 0.0]
    assert torch.equal(ode_timesteps(250), torch.linspace(1, 0, 251, dtype=torch.float64))


def test_score_from_velocity_inverts_the_interpolant() -> None:
    # x_t = alpha x0 + sigma eps, v = alpha' x0 + sigma' eps  ->  score = -eps / sigma
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, generator=g,
                                                                                  dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    tt = t.view(-1, 1, 1)
    for path, (a, s, da, ds) in {
        "linear": (1 - tt, tt, -torch.ones_like(tt), torch.ones_like(tt)),
        "cosine": (torch.cos(tt * np.pi / 2), torch.sin(tt * np.pi / 2), -np.pi / 2 * torch.sin(tt * np.pi / 2),
                   np.pi / 2 * torch.cos(tt * np.pi / 2)),
    }.items():
        score = score_from_velocity(da * x0 + ds * eps, a * x0 + s * eps, t, path)
        torch.testing.assert_close(score, -eps / s)


def test_respacing_and_schedules() -> None:
    assert space_timesteps(1000, "10") == set(range(0, 1000, 111))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    d = create_diffusion("250", "cosine")
    assert d.num_steps == 250 and d.timestep_map[0] == 0 and d.timestep_map[-1] == 999
    full = create_diffusion("", "linear")
    assert full.num_steps == 1000 and full.betas[0] == pytest.approx(1e-4) and full.betas[-1] == pytest.approx(0.02)
    cos = beta_schedule("cosine")
    assert cos.max() == pytest.approx(0.999) and (np.diff(np.cumprod(1 - cos)) < 0).all()
    # respaced alphas_cumprod equal the originals at the kept steps
    base = create_diffusion("", "cosine")
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[list(d.timestep_map)], rtol=1e-12)


# ------------------------------------------------------------------------- step API == functional API


@pytest.mark.parametrize("name,path", [("euler", "linear"), ("heun", "linear"), ("sde", "linear"), ("sde", "cosine")])
def test_flow_step_sampler_equals_functional(sit, name, path) -> None:
    req = request(name, path_type=path)
    out = run_to_completion(get_sampler(name, sit.config), sit, [req], (L, C))
    lat, g = first_noise(req.seed)
    y = torch.tensor([req.class_id])
    kw = {"cfg_scale": req.cfg_scale, "guidance_low": req.guidance_low, "guidance_high": req.guidance_high,
          "path_type": path}
    if name == "sde":
        ref = euler_maruyama_sampler(sit, lat, y, req.steps, generator=g, **kw)
    else:
        ref = euler_sampler(sit, lat, y, req.steps, heun=name == "heun", **kw)
    assert out.dtype == torch.float64 and ref.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_diffusion_step_sampler_equals_functional(dit, name, cfg) -> None:
    req = request(name, cfg_scale=cfg, guidance_high=1.0, steps=6)
    out = run_to_completion(get_sampler(name, dit.config), dit, [req], (L, C))
    lat, g = first_noise(req.seed)
    fn = ddpm_sampler if name == "ddpm" else ddim_sampler
    ref = fn(dit, lat, torch.tensor([req.class_id]), req.steps, cfg_scale=cfg, generator=g)
    assert ref.dtype == torch.float32
    torch.testing.assert_close(out, ref.double(), atol=1e-6 * float(ref.abs().max()), rtol=0)


def test_sde_global_generator_matches_seeded_generator(sit) -> None:
    lat, _ = first_noise(0, n=2)
    y = torch.tensor([3, 4])
    torch.manual_seed(123)
    a = euler_maruyama_sampler(sit, lat, y, 4, cfg_scale=2.0)
    b = euler_maruyama_sampler(sit, lat, y, 4, cfg_scale=2.0, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b)


def test_ddim_is_deterministic_given_latents(dit) -> None:
    lat, _ = first_noise(5)
    y = torch.tensor([9])
    a = ddim_sampler(dit, lat, y, 5, generator=torch.Generator().manual_seed(1))
    b = ddim_sampler(dit, lat, y, 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = ddpm_sampler(dit, lat, y, 5, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------------- batch determinism


MIXED = [  # (class, seed, cfg, low, high, steps, path)
    (1, 100, 1.0, 0.0, 1.0, 8, "linear"), (2, 101, 4.0, 0.0, 0.7, 8, "cosine"), (1000, 102, 1.0, 0.0, 1.0, 6, "linear"),
    (207, 103, 1.75, 0.2, 0.9, 10, "cosine"), (5, 104, 2.0, 0.0, 1.0, 8, "linear"), (6, 105, 1.5, 0.5, 1.0, 5, "linear"),
    (7, 106, 3.0, 0.0, 0.3, 8, "cosine"),
]


@pytest.mark.parametrize("name", ["sde", "heun", "ddpm"])
def test_row_result_independent_of_batch(sit, dit, name) -> None:
    model = dit if name == "ddpm" else sit
    sampler = get_sampler(name, model.config)
    target = request(name, path_type="cosine")
    alone = run_to_completion(sampler, model, [target], (L, C))[0]

    others = [SampleRequest(c, s, n, cfg, lo, hi, name, p) for c, s, cfg, lo, hi, n, p in MIXED]
    rows = [sampler.init_row(r, (L, C)) for r in others[:4]]
    mine = sampler.init_row(target, (L, C))
    rows.insert(2, mine)
    late = [sampler.init_row(r, (L, C)) for r in others[4:]]
    step = 0
    while not mine.done:
        if step == 3:  # rows join mid-way
            rows += late
        sampler.step(model, [r for r in rows if not r.done])
        step += 1
    assert len(rows) == 8
    scale = max(1.0, float(alone.abs().max()))
    torch.testing.assert_close(sampler.result(mine), alone, atol=1e-5 * scale, rtol=0)
    # the late rows equal their own solo runs too
    solo = run_to_completion(sampler, model, [others[6]], (L, C))[0]
    while not all(r.done for r in rows):
        sampler.step(model, [r for r in rows if not r.done])
    torch.testing.assert_close(sampler.result(rows[-1]), solo, atol=1e-5 * max(1.0, float(solo.abs().max())), rtol=0)


def test_same_seed_same_latents_different_seed_differs(sit) -> None:
    s = get_sampler("sde", sit.config)
    a = run_to_completion(s, sit, [request("sde"), request("sde", seed=12)], (L, C))
    b = run_to_completion(s, sit, [request("sde")], (L, C))
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    assert (a[0] - a[1]).abs().max() > 0.1


# ------------------------------------------------------------------------------------------ guidance


@pytest.mark.parametrize("name", ["euler", "heun", "sde", "ddpm", "ddim"])
def test_cfg_one_runs_no_unconditional_pass(sit, dit, name) -> None:
    model = dit if name in ("ddpm", "ddim") else sit
    counter = Counter(model)
    sampler = get_sampler(name, model.config)
    reqs = [request(name, cfg_scale=1.0, seed=i, class_id=i) for i in range(3)]
    rows = [sampler.init_row(r, (L, C)) for r in reqs]
    stats = []
    while not all(r.done for r in rows):
        stats.append(sampler.step(counter, rows))
    assert counter.uncond_rows == 0 and all(n == 3 for n, _ in counter.calls)
    assert sum(s.uncond_rows for s in stats) == 0 and sum(s.forwards for s in stats) == len(counter.calls)
    assert sum(s.model_rows for s in stats) == sum(n for n, _ in counter.calls)


@pytest.mark.parametrize("name", ["euler", "heun", "sde"])
def test_guidance_interval_packs_only_rows_inside(sit, name) -> None:
    counter = Counter(sit)
    sampler = get_sampler(name, sit.config)
    steps = 10
    inside = request(name, cfg_scale=3.0, guidance_low=0.0, guidance_high=0.5, steps=steps)
    always = request(name, cfg_scale=3.0, guidance_low=0.0, guidance_high=1.0, steps=steps, seed=3)
    rows = [sampler.init_row(r, (L, C)) for r in (inside, always)]
    grid = rows[0].state["t"]
    while not rows[0].done:
        sampler.step(counter, rows)
    n_in = sum(1 for t in grid[:steps] if 0.0 <= t <= 0.5)
    evals = [2 if (name == "heun" and i < steps - 1) else 1 for i in range(steps)]
    expected = sum(e for i, e in enumerate(evals) if grid[i] <= 0.5) + sum(evals)
    assert 0 < n_in < steps and counter.uncond_rows == expected


@pytest.mark.parametrize("name", ["euler", "sde"])
def test_guidance_interval_equals_cfg_off_outside(sit, name) -> None:
    sampler = get_sampler(name, sit.config)
    steps = 10
    guided = sampler.init_row(request(name, cfg_scale=4.0, guidance_low=0.0, guidance_high=0.55, steps=steps), (L, C))
    plain = sampler.init_row(request(name, cfg_scale=1.0, steps=steps), (L, C))
    grid = guided.state["t"]
    outside = sum(1 for t in grid[:steps] if t > 0.55)
    for _ in range(outside):
        sampler.step(sit, [guided])
        sampler.step(sit, [plain])
    assert torch.equal(guided.x, plain.x)  # cfg had no effect over the out-of-interval steps
    sampler.step(sit, [guided])
    sampler.step(sit, [plain])
    assert not torch.allclose(guided.x, plain.x)


def test_dit_guidance_uses_eps_half_and_interval(dit) -> None:
    sampler = get_sampler("ddpm", dit.config)
    counter = Counter(dit)
    rows = [sampler.init_row(request("ddpm", cfg_scale=2.0, guidance_low=0.0, guidance_high=0.5, steps=10), (L, C))]
    diff = rows[0].state["diffusion"]
    while not rows[0].done:
        sampler.step(counter, rows)
    assert counter.uncond_rows == sum(1 for t in diff.timestep_map if t / 1000 <= 0.5)


# ------------------------------------------------------------------------------------------ plumbing


def test_get_sampler_validates() -> None:
    with pytest.raises(ValueError):
        get_sampler("ddpm", "sit")
    with pytest.raises(ValueError):
        get_sampler("sde", "dit")
    with pytest.raises(ValueError):
        get_sampler("euler", object())
    s = get_sampler("ddim", "dit", noise_schedule="linear")
    assert s.name == "ddim" and s.noise_schedule == "linear"
    with pytest.raises(ValueError, match="steps"):
        s.init_row(request("ddim", steps=1), (L, C))
    f = get_sampler("euler", "sit")
    row = f.init_row(request("euler", steps=1), (L, C))
    f.step(lambda x, t, y: torch.zeros_like(x), [row])
    assert row.done and torch.equal(f.result(row), row.x)
    with pytest.raises(ValueError, match="finished"):
        f.step(lambda x, t, y: torch.zeros_like(x), [row])


@pytest.mark.parametrize("name,sampler", [("sit-tiny-64x32", "sde"), ("sit-tiny-32x64", "heun"),
                                          ("dit-tiny-64x32", "ddpm"), ("dit-tiny-32x64", "ddim")])
def test_ten_step_generation_on_cpu_is_fast(name, sampler) -> None:
    model = randomize(create_model(name), seed=2)
    cfg = model.config
    reqs = [SampleRequest(c, seed=c, steps=10, cfg_scale=1.75, guidance_high=0.7, sampler=sampler)
            for c in (1, 2, 3, 4)]
    start = time.perf_counter()
    out = run_to_completion(get_sampler(sampler, cfg), model, reqs, (cfg.num_tokens, cfg.token_dim))
    assert time.perf_counter() - start < 60  # a generous ceiling: seconds when the CPU is not shared
    assert out.shape == (4, cfg.num_tokens, cfg.token_dim) and torch.isfinite(out).all()
