"""Generator objectives on normalised latents x0 (B, L, C).

* :func:`flow_matching_loss` (SiT): the linear interpolant ``x_t = (1 - t) x0 + t eps`` (t = 1 noise,
  t = 0 data) and the velocity target ``v = eps - x0``; t ~ U(0, 1) or logit-normal
  (``sigmoid(N(m, s))``, more weight on mid times).
* :func:`diffusion_loss` (DiT): the ADM / DiT objective over the 1,000-step schedule: eps MSE, plus with a
  learned variance the variational bound term with the mean frozen (stop-gradient on eps), so the variance
  head learns from the VLB only. At t = 0 the bound's decoder term is the *continuous* Gaussian negative
  log-likelihood of x0 (the latents are not 8-bit pixels, so ADM's discretised likelihood does not apply):
  a documented simplification.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.sampling.diffusion import GaussianDiffusion


def sample_time(n: int, kind: str, generator: torch.Generator, lognormal: tuple[float, float] = (0.0, 1.0),
                device: torch.device | str = "cpu") -> torch.Tensor:
    """(n,) times in [0, 1]."""
    if kind == "uniform":
        t = torch.rand(n, generator=generator)
    elif kind == "lognormal":
        t = torch.sigmoid(torch.randn(n, generator=generator) * lognormal[1] + lognormal[0])
    else:
        raise ValueError(f"unknown time sampling {kind!r} (uniform | lognormal)")
    return t.to(device)


def flow_matching_loss(model_fn, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                       force_drop: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared velocity error; the model may output 2C channels (learned sigma), the first C count."""
    tt = t.view(-1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    target = noise - x0
    pred = model_fn(xt, t, y, force_drop=force_drop)[..., : x0.shape[-1]]
    return F.mse_loss(pred.float(), target)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def diffusion_loss(model_fn, diff: GaussianDiffusion, x0: torch.Tensor, y: torch.Tensor, k: torch.Tensor,
                   noise: torch.Tensor, learn_sigma: bool, use_vlb: bool = True,
                   force_drop: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """DiT's training loss at integer steps k (B,) of the (un-respaced) diffusion ``diff``.

    Returns ``{"loss", "mse", ["vb"]}``: ``mse`` = mean (eps - eps_hat)^2; ``vb`` = the bound term in bits
    per dimension (mean over tokens and channels), with eps_hat detached."""
    c = x0.shape[-1]
    ac = diff.coef("alphas_cumprod", k, x0.dim())
    xt = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    out = model_fn(xt, k.float(), y, force_drop=force_drop).float()
    eps = out[..., :c]
    mse = (eps - noise).pow(2).mean()
    terms = {"mse": mse}
    loss = mse
    if learn_sigma and use_vlb:
        v = out[..., c : 2 * c]
        min_log = diff.coef("posterior_log_variance_clipped", k, x0.dim())
        max_log = diff.coef("log_betas", k, x0.dim())
        frac = (v + 1) / 2
        model_logvar = frac * max_log + (1 - frac) * min_log
        eps_d = eps.detach()
        pred_x0 = diff.coef("sqrt_recip_alphas_cumprod", k, x0.dim()) * xt - diff.coef(
            "sqrt_recipm1_alphas_cumprod", k, x0.dim()) * eps_d
        c1, c2 = diff.coef("posterior_mean_coef1", k, x0.dim()), diff.coef("posterior_mean_coef2", k, x0.dim())
        model_mean = c1 * pred_x0 + c2 * xt
        true_mean = c1 * x0 + c2 * xt
        kl = normal_kl(true_mean, min_log, model_mean, model_logvar).flatten(1).mean(1) / math.log(2.0)
        nll = 0.5 * (math.log(2 * math.pi) + model_logvar + (x0 - model_mean) ** 2 * torch.exp(-model_logvar))
        nll = nll.flatten(1).mean(1) / math.log(2.0)
        vb = torch.where(k == 0, nll, kl).mean()
        terms["vb"] = vb
        loss = loss + vb
    terms["loss"] = loss
    return terms
