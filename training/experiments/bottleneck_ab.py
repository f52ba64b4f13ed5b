"""A/B of the softvq-taef2 bottleneck on the validation feature cache (issue #16): which change learns the
latent grid fastest per step. Trains one variant from scratch on the first 9,500 cached validation latents
and prints the held-out relative grid MSE of the last 500 every 100 steps (JSON lines).

    python -m training.experiments.bottleneck_ab --variant base --steps 300 --threads 1

Variants: ``base`` (softvq-taef2-32x64 as configured), ``bypass`` (no quantizer: LayerNorm'd features, the
upper bound of the same transformer), ``soft_tau02`` (tau 0.2, no KL term), ``wide`` (width 256, 4 heads),
``deep_dec`` (5 decoder blocks). Needs ``runs/cache/tiny-val`` (``python -m training cache-features``).
Measured in session 5 (1 thread each, two variants at a time on the 2-core VM; held-out rel. MSE at step
100 / 200 / 300): base 0.806 / 0.744 / 0.633; bypass 0.753 / 0.666 / 0.537; soft_tau02 0.801 / 0.746 / 0.673;
wide 0.801 / 0.721 / 0.623 (1.4x the step time). The soft quantizer costs the most; a softer tau does not
help; width helps a little per step but not per CPU second. Early steps only: confirm over ~1,000 steps.

Session 6 added a linear pair path beside the ViTs (``pairskip``: grid positions 2i, 2i+1 -> token i -> back,
``SoftVQTAEF2Config.pair_skip``), alone and with a 2-level residual soft quantizer (``pairskip_res2``), plus
``pairskip_tau02``, ``product16`` and ``residual3`` (not run to a result). Same seed and data, rel. MSE at step
100 / 200 / 300 / 400 (measured when the script still built the pair path's two linears itself, after the
aligner; the model's own ``pair_skip`` layers now serve, initialised in another order): pairskip 0.672 /
0.339 / 0.227 / 0.156 (the main run of the base model needed 4,500 steps of batch 64 on the full training
cache for 0.206); pairskip_res2 0.576 / 0.263 (stopped there). The
ViTs alone were slow to learn to route each grid position through the latent tokens; the linear path gives
them that from the start. softvq-taef2-32x64-skip = pair path + 2-level residual soft quantizer.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

import models
from models.softvq_taef2 import SoftVQTAEF2
from training.feature_cache import open_feature_cache
from training.losses import TokenAligner, kl_from_losses

VARIANTS: dict[str, dict] = {
    "base": {},
    "bypass": {"bypass": True},
    "soft_tau02": {"overrides": {"tau": 0.2}, "kl_weight": 0.0},
    "wide": {"overrides": {"width": 256, "heads": 4}},
    "deep_dec": {"overrides": {"dec_depth": 5}},
    "pairskip": {"overrides": {"pair_skip": True}},
    "pairskip_res2": {"overrides": {"pair_skip": True, "quantizer": "residual", "num_levels": 2}},
    "pairskip_tau02": {"overrides": {"pair_skip": True, "tau": 0.2}, "kl_weight": 0.0},
    "product16": {"overrides": {"quantizer": "product", "num_groups": 16}},
    "residual3": {"overrides": {"quantizer": "residual", "num_levels": 3}},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="base")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="runs/cache/tiny-val")
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    v = VARIANTS[a.variant]
    cache = open_feature_cache(a.cache)
    z_all = torch.from_numpy(np.array(cache.latents)).float()
    f_all = torch.from_numpy(np.array(cache.lite)).float()
    z_tr, f_tr, z_te = z_all[:-500], f_all[:-500], z_all[-500:]
    norm = {"latent_shift": float(z_tr.mean()), "latent_scale": 1.0 / float(z_tr.std())}
    torch.manual_seed(0)
    m = SoftVQTAEF2(models.get_config("softvq-taef2-32x64", **norm, **v.get("overrides", {})))
    aligner = TokenAligner(m.config.token_dim, f_all.shape[1], 512)
    params = [p for p in m.parameters() if p.requires_grad] + list(aligner.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    kl_weight = v.get("kl_weight", 0.01)

    def tokens(z: torch.Tensor, losses: bool):
        if v.get("bypass"):
            feats = m.quant_conv(m.encoder(m.grid_from_latents(z)))
            return F.layer_norm(feats, feats.shape[-1:]) * 0.125, None
        enc = m.encode_latents(z, losses)
        return enc.tokens, enc.quantizer

    t0 = time.time()
    for step in range(1, a.steps + 1):
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, step / 50)
        idx = torch.randint(0, len(z_tr), (64,), generator=gen)
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tok, q = tokens(z_tr[idx], True)
            loss = F.mse_loss(m.decode_grid(tok).float(), m.grid_from_latents(z_tr[idx]))
            if q is not None and kl_weight > 0:
                loss = loss + kl_weight * kl_from_losses(q.losses)
            loss = loss + 0.1 * aligner(tok.float(), f_tr[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == a.steps:
            m.eval()
            with torch.no_grad():
                tok, _ = tokens(z_te, False)
                target = m.grid_from_latents(z_te)
                rel = float((m.decode_grid(tok) - target).pow(2).sum() / (target - target.mean()).pow(2).sum())
            print(json.dumps({"variant": a.variant, "step": step, "rel_mse": round(rel, 4),
                              "s": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
