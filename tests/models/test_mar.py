"""MAR: published key layouts and sizes, forward structure, the step sampler (schedule, guidance, batch
independence) and the training loss. Published sizes are built on the meta device; everything that runs
uses tiny widths."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

from models.hub import load_into, load_pretrained, read_state_dict, save_pretrained
from models.mar import MAR, MARConfig, infer_config
from models.registry import create_model, get_config, list_models
from models.sampling.base import SampleRequest, run_to_completion
from models.sampling.diffusion import create_diffusion
from models.sampling.mar import (
    MARSampler,
    MARSampleRequest,
    cfg_at,
    mar_loss,
    masked_count,
    random_mask,
    sample_mask_ratio,
)

# FORMATS-MAR-XQV 1.1 / 1.3: name -> (D, depth, tensors, params, DiffLoss params in M (2 decimals),
# head width W, head depth d)
PUBLISHED = {
    "mar-base": (768, 12, 364, 207_924_768, 35.75, 1024, 6),
    "mar-large": (1024, 16, 476, 478_326_304, 72.23, 1280, 8),
    "mar-huge": (1280, 20, 604, 942_403_104, 151.21, 1536, 12),
}
BLOCK_KEYS = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
              for p in ("weight", "bias")]


def meta_state(cfg: MARConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return MAR(cfg).state_dict()


def expected_keys(depth: int, head_depth: int) -> set[str]:
    keys = {"class_emb.weight", "fake_latent", "z_proj.weight", "z_proj.bias", "z_proj_ln.weight",
            "z_proj_ln.bias",
            "encoder_pos_embed_learned", "encoder_norm.weight", "encoder_norm.bias", "decoder_embed.weight",
            "decoder_embed.bias", "mask_token", "decoder_pos_embed_learned", "decoder_norm.weight",
            "decoder_norm.bias", "diffusion_pos_embed_learned"}
    for part in ("encoder_blocks", "decoder_blocks"):
        keys |= {f"{part}.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS}
    net = "diffloss.net"
    keys |= {f"{net}.{m}.{p}" for m in ("time_embed.mlp.0", "time_embed.mlp.2", "cond_embed", "input_proj",
                                         "final_layer.linear", "final_layer.adaLN_modulation.1")
             for p in ("weight", "bias")}
    keys |= {f"{net}.res_blocks.{i}.{m}.{p}" for i in range(head_depth)
             for m in ("in_ln", "mlp.0", "mlp.2", "adaLN_modulation.1") for p in ("weight", "bias")}
    return keys


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_layout(name: str) -> None:
    D, depth, n_tensors, n_params, head_m, W, d = PUBLISHED[name]
    cfg = get_config(name)
    assert (cfg.num_tokens, cfg.token_dim, cfg.buffer_size, cfg.tokenizer) == (256, 16, 64, "kl16")
    assert (cfg.diffusion_steps, cfg.cfg_schedule, cfg.num_train_timesteps) == (100, "linear", 1000)
    sd = meta_state(cfg)
    assert len(sd) == n_tensors
    assert set(sd) == expected_keys(depth, d)
    assert sum(v.numel() for v in sd.values()) == n_params
    assert round(sum(v.numel() for k, v in sd.items() if k.startswith("diffloss.")) / 1e6, 2) == head_m
    shapes = {
        "class_emb.weight": (1000, D), "fake_latent": (1, D), "z_proj.weight": (D, 16),
        "encoder_pos_embed_learned": (1, 320, D), "decoder_pos_embed_learned": (1, 320, D),
        "diffusion_pos_embed_learned": (1, 256, D), "mask_token": (1, 1, D), "decoder_embed.weight": (D, D),
        "encoder_blocks.0.attn.qkv.weight": (3 * D, D), "encoder_blocks.0.mlp.fc1.weight": (4 * D, D),
        "diffloss.net.time_embed.mlp.0.weight": (W, 256), "diffloss.net.time_embed.mlp.2.weight": (W, W),
        "diffloss.net.cond_embed.weight": (W, D), "diffloss.net.input_proj.weight": (W, 16),
        "diffloss.net.res_blocks.0.in_ln.weight": (W,), "diffloss.net.res_blocks.0.mlp.0.weight": (W, W),
        "diffloss.net.res_blocks.0.adaLN_modulation.1.weight": (3 * W, W),
        "diffloss.net.final_layer.linear.weight": (32, W),
        "diffloss.net.final_layer.adaLN_modulation.1.weight": (2 * W, W),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


def test_softvq_shaped_huge() -> None:
    # FORMATS-MAR-XQV 1.8: mar_huge on 64 tokens x 32 dims
    sd = meta_state(get_config("mar-huge", num_tokens=64, token_dim=32))
    assert sd["encoder_pos_embed_learned"].shape == (1, 128, 1280)
    assert sd["diffusion_pos_embed_learned"].shape == (1, 64, 1280)
    assert sd["z_proj.weight"].shape == (1280, 32)
    assert sd["diffloss.net.input_proj.weight"].shape == (1536, 32)
    assert sd["diffloss.net.final_layer.linear.weight"].shape == (64, 1536)
    assert round(sum(v.numel() for v in sd.values()) / 1e6, 2) == 941.76


def test_small_configs_registered() -> None:
    names = list_models("MAR")
    assert {"mar-base", "mar-large", "mar-huge", "mar-tiny-64x32", "mar-s-64x32"} <= set(names)
    for name in ("mar-tiny-64x32", "mar-s-64x32"):
        cfg = get_config(name)
        assert (cfg.num_tokens, cfg.token_dim, cfg.num_classes) == (64, 32, 1000)
        assert cfg.tokenizer.startswith("softvq-")
    assert 256 <= get_config("mar-s-64x32").hidden_size <= 384
    with pytest.raises(ValueError):
        get_config("mar-tiny-64x32", cfg_schedule="cosine")


# ------------------------------------------------------------------------------------------- forward


def tiny(**kw) -> MAR:
    torch.manual_seed(0)
    model = create_model("mar-tiny-64x32", **kw).eval()
    with torch.no_grad():  # non-trivial weights everywhere (the head is zero-initialised)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def reference_forward(model: MAR, tokens: torch.Tensor, mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """The published forward with boolean dropping (every row has the same known count)."""
    cfg = model.config
    B, buf = tokens.shape[0], cfg.buffer_size
    x = model.z_proj(tokens)
    x = torch.cat([torch.zeros(B, buf, x.shape[-1]), x], dim=1)
    x[:, :buf] = model.class_embedding(labels)[:, None]
    x = model.z_proj_ln(x + model.encoder_pos_embed_learned)
    keep = torch.cat([torch.ones(B, buf, dtype=torch.bool), ~mask], dim=1)
    x = x[keep].reshape(B, -1, x.shape[-1])
    for blk in model.encoder_blocks:
        x = blk(x)
    x = model.decoder_embed(model.encoder_norm(x))
    full = model.mask_token.repeat(B, keep.shape[1], 1)
    full[keep] = x.reshape(-1, x.shape[-1])
    x = full + model.decoder_pos_embed_learned
    for blk in model.decoder_blocks:
        x = blk(x)
    return model.decoder_norm(x)[:, buf:] + model.diffusion_pos_embed_learned


def test_forward_matches_published_structure() -> None:
    model = tiny()
    B, L, C = 3, 64, 32
    tokens = torch.randn(B, L, C)
    mask = random_mask(B, L, 0.75, torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 207, 1000])
    with torch.no_grad():
        z = model(tokens, mask, labels)
        ref = reference_forward(model, tokens, mask, labels)
    assert z.shape == (B, L, model.config.hidden_size)
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    # values at unknown positions are ignored
    with torch.no_grad():
        z2 = model(torch.where(mask[..., None], torch.randn(B, L, C), tokens), mask, labels)
    torch.testing.assert_close(z2, z, rtol=0, atol=0)


def test_rows_with_different_known_counts_share_a_forward() -> None:
    model = tiny()
    L, C = 64, 32
    tokens = torch.randn(4, L, C)
    mask = torch.ones(4, L, dtype=torch.bool)
    mask[1, :10] = False
    mask[2, 5:50] = False
    mask[3] = False
    labels = torch.tensor([1, 2, 3, 1000])
    with torch.no_grad():
        z = model(tokens, mask, labels)
        for i in range(4):
            zi = model(tokens[i:i + 1], mask[i:i + 1], labels[i:i + 1])
            torch.testing.assert_close(z[i:i + 1], zi, rtol=1e-5, atol=1e-5)


def test_class_embedding_null_and_drop() -> None:
    model = tiny()
    emb = model.class_embedding(torch.tensor([5, 1000]), force_drop=torch.tensor([True, False]))
    torch.testing.assert_close(emb, model.fake_latent.expand(2, -1))
    torch.testing.assert_close(model.class_embedding(torch.tensor([5])), model.class_emb.weight[5:6])
    model.train()
    torch.manual_seed(0)
    dropped = (model.class_embedding(torch.full((4000,), 7)) == model.fake_latent).all(1).float().mean()
    assert 0.08 < float(dropped) < 0.12  # class_dropout_prob 0.1


def test_head_numerics() -> None:
    model = tiny()
    net = model.diffloss.net
    x, t, c = torch.randn(5, 32), torch.tensor([0.0, 10, 500, 989, 999]), torch.randn(5, 64)
    with torch.no_grad():
        out = model.head(x, t, c)
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None] * freqs[None]
        y = net.time_embed.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1)) + net.cond_embed(c)
        h = net.input_proj(x)
        for blk in net.res_blocks:
            shift, scale, gate = blk.adaLN_modulation(y).chunk(3, -1)
            ln = torch.nn.functional.layer_norm(h, (64,), blk.in_ln.weight, blk.in_ln.bias, 1e-6)
            h = h + gate * blk.mlp(ln * (1 + scale) + shift)
        shift, scale = net.final_layer.adaLN_modulation(y).chunk(2, -1)
        ref = net.final_layer.linear(torch.nn.functional.layer_norm(h, (64,), eps=1e-6) * (1 + scale) + shift)
    assert out.shape == (5, 64)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    fresh = create_model("mar-tiny-64x32")  # adaLN-Zero: a fresh head predicts zeros
    assert fresh.head(x, t, c).abs().max() == 0


# ------------------------------------------------------------------------------------------ schedule


def test_schedule_facts() -> None:
    # FORMATS-MAR-XQV 1.6: L = 256, 64 iterations reveal 1 token first and 6-7 at the end; 256 reveal 1 each
    def reveals(n: int) -> list[int]:
        left, out = 256, []
        for s in range(n):
            m = masked_count(256, s, n, left)
            nxt = 0 if s == n - 1 else m
            out.append(left - nxt)
            left = nxt
        return out

    r64 = reveals(64)
    assert sum(r64) == 256 and r64[0] == 1 and set(r64[-4:]) <= {6, 7}
    assert reveals(256) == [1] * 256
    assert reveals(8) == [5, 15, 24, 31, 39, 45, 48, 49]
    cfgs = [cfg_at(3.0, "linear", 256, masked_count(256, s, 8, 256)) for s in (0,)]
    assert round(cfgs[0], 3) == 1.039 and round(cfg_at(3.0, "linear", 256, 1), 3) == 2.992
    assert cfg_at(3.0, "constant", 256, 7) == 3.0


class OracleHead:
    """The real MAR backbone and head, with the head's eps pulled towards the optimum for unit-variance
    data (sqrt(1 - alpha_bar) x), so samples stay O(1) whatever the random weights."""

    def __init__(self, model: MAR, strength: float = 0.3) -> None:
        self.model = model
        self.strength = strength
        self.ac = torch.tensor(create_diffusion("", "cosine").alphas_cumprod)
        self.head_batches: list[int] = []

    def backbone(self, tokens, mask, labels):
        return self.model.backbone(tokens, mask, labels)

    def head(self, x, t, z):
        self.head_batches.append(x.shape[0])
        ac = self.ac.to(x.dtype)[t.long()][:, None]
        out = self.model.head(x, t, z)
        base = torch.cat([torch.sqrt(1 - ac) * x, torch.zeros_like(x)], dim=1)
        return base + self.strength * torch.tanh(out) * torch.sqrt(ac)


def test_head_batches_follow_published_counts() -> None:
    # FORMATS-MAR-XQV 1.6: an 8-step cfg-3 run (B = 2) calls the head with 20, 60, ..., 196 rows
    model = tiny(num_tokens=256, token_dim=16)
    oracle = OracleHead(model)
    sampler = MARSampler.from_config(model.config)
    reqs = [MARSampleRequest(class_id=c, seed=c, steps=8, cfg_scale=3.0, diffusion_steps=2) for c in (1, 2)]
    rows = [sampler.init_row(r, (256, 16)) for r in reqs]
    stats = []
    while not rows[0].done:
        stats.append(sampler.step(oracle, rows))
    assert oracle.head_batches[::2] == [20, 60, 96, 124, 156, 180, 192, 196]
    assert [s.uncond_rows for s in stats] == [2] * 8 and all(s.forwards == 1 for s in stats)
    assert all(not r.state["mask"].any() for r in rows)


def test_reveal_order_and_guidance_switches() -> None:
    model = tiny()
    sampler = MARSampler.from_config(model.config)
    row = sampler.init_row(MARSampleRequest(class_id=1, seed=3, steps=4, diffusion_steps=2), (64, 32))
    order = row.state["order"]
    assert sorted(order.tolist()) == list(range(64))
    stats = sampler.step(OracleHead(model), [row])
    m = masked_count(64, 0, 4, 64)
    assert row.state["mask"].nonzero().squeeze(1).sort().values.tolist() == sorted(order[:m].tolist())
    assert (row.x[order[m:]] != 0).all() and (row.x[order[:m]] == 0).all()
    assert stats.uncond_rows == 0 and stats.tokens == 64 - m
    # guidance only when cfg > 1 and the masked fraction lies in the interval
    g = MARSampleRequest(class_id=1, seed=3, steps=4, cfg_scale=2.0, guidance_high=0.95, diffusion_steps=2)
    rows = [sampler.init_row(g, (64, 32))]
    assert sampler.step(OracleHead(model), rows).uncond_rows == 0  # 64/64 masked > 0.95; then 59/64
    assert sampler.step(OracleHead(model), rows).uncond_rows == 1


def test_temperature_scales_only_step_noise() -> None:
    model = tiny()
    sampler = MARSampler.from_config(model.config)

    def run(temp: float) -> torch.Tensor:
        req = MARSampleRequest(class_id=4, seed=1, steps=2, temperature=temp, diffusion_steps=4)
        return run_to_completion(sampler, OracleHead(model), [req], (64, 32))

    assert (run(0.0) - run(1.0)).abs().max() > 1e-3
    # the row's draws: its order, then per iteration (S, k, C) with block 0 (initial noise) unscaled
    row = sampler.init_row(MARSampleRequest(class_id=4, seed=5, steps=1, temperature=0.5, diffusion_steps=3),
                           (64, 32))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(torch.randperm(64, generator=g), row.state["order"])
    expected = torch.randn((3, 64, 32), generator=g)
    noise = sampler._plan(row).noise
    assert torch.equal(noise[0], expected[0]) and torch.equal(noise[1:], 0.5 * expected[1:])


def test_plain_request_uses_config_defaults() -> None:
    model = tiny()
    sampler = MARSampler.from_config(model.config)
    row = sampler.init_row(SampleRequest(class_id=1, seed=0, steps=2), (64, 32))
    assert row.state["diffusion"].num_steps == model.config.diffusion_steps
    assert row.state["cfg_schedule"] == "linear" and row.state["temperature"] == 1.0
    for bad in (1, 5000):  # the respaced DDPM needs at least 2 steps
        with pytest.raises(ValueError):
            sampler.init_row(MARSampleRequest(class_id=1, seed=0, steps=2, diffusion_steps=bad), (64, 32))


BATCH = [  # class, seed, iterations, cfg, diffusion steps, schedule, temperature
    (1, 0, 3, 1.0, 4, None, None), (207, 1, 4, 3.0, 4, "constant", 0.9), (5, 2, 3, 2.0, 3, None, None),
    (999, 3, 2, 1.5, 4, None, 1.0), (3, 4, 5, 1.0, 4, None, None), (9, 5, 3, 4.0, 4, "linear", 1.0),
    (1, 6, 1, 1.0, 2, None, None), (7, 7, 4, 2.5, 4, None, 1.2),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-3)])
def test_row_independent_of_batch(dtype: torch.dtype, tol: float) -> None:
    """A row gives the same latents alone and in a batch of 8 rows with other classes, seeds, scales,
    schedules, iteration counts and diffusion steps. In float32 the first DDPM step amplifies matmul
    round-off by up to ~1/sqrt(alpha_bar_999) ~ 2e4 (float64 shows the logic itself is exact)."""
    model = tiny().to(dtype)
    oracle = OracleHead(model)
    sampler = MARSampler.from_config(model.config, dtype=dtype)
    reqs = [MARSampleRequest(class_id=c, seed=s, steps=n, cfg_scale=g, diffusion_steps=d, cfg_schedule=sch,
                             temperature=tp) for c, s, n, g, d, sch, tp in BATCH]
    batched = run_to_completion(sampler, oracle, reqs, (64, 32))
    assert batched.dtype == torch.float64 and batched.abs().max() < 50
    for i, r in enumerate(reqs):
        alone = run_to_completion(sampler, oracle, [r], (64, 32))[0]
        assert (alone - batched[i]).abs().max() <= tol, i
    again = run_to_completion(sampler, oracle, [dataclasses.replace(reqs[1], seed=100)], (64, 32))[0]
    assert (again - batched[1]).abs().max() > 0.1


def test_tiny_generation_runs_in_seconds() -> None:
    model = create_model("mar-tiny-64x32").eval()
    cfg = model.config
    sampler = MARSampler.from_config(cfg)
    reqs = [MARSampleRequest(class_id=c, seed=c, steps=cfg.num_iter, cfg_scale=2.0) for c in (1, 207)]
    start = time.perf_counter()
    out = run_to_completion(sampler, model, reqs, (cfg.num_tokens, cfg.token_dim))
    assert time.perf_counter() - start < 10
    assert out.shape == (2, 64, 32) and torch.isfinite(out).all() and (out != 0).all()


def test_clip_x0_bounds_samples_of_an_imprecise_head() -> None:
    """Random weights are an imprecise head: unclipped, the first respaced step amplifies its eps error into
    huge tokens; ``clip_x0`` keeps every predicted clean token, and so the sample, within the bound."""
    torch.manual_seed(0)
    model = create_model("mar-tiny-64x32").eval()
    reqs = [MARSampleRequest(class_id=1, seed=0, steps=model.config.num_iter, cfg_scale=1.0)]
    free = run_to_completion(MARSampler.from_config(model.config), model, reqs, (64, 32))
    clipped_cfg = dataclasses.replace(model.config, clip_x0=3.0)
    clipped = run_to_completion(MARSampler.from_config(clipped_cfg), model, reqs, (64, 32))
    assert float(free.abs().max()) > 3.0 and float(clipped.abs().max()) <= 3.0 + 1e-4
    with pytest.raises(ValueError):
        dataclasses.replace(model.config, clip_x0=-1.0)


# ------------------------------------------------------------------------------------------ checkpoints


def test_hub_round_trip_and_published_dict(tmp_path) -> None:
    model = tiny(trained_classes=(1, 207))
    save_pretrained(model, tmp_path / "mar")
    again = load_pretrained(tmp_path / "mar")
    assert isinstance(again, MAR) and again.config == model.config
    tokens, mask = torch.randn(2, 64, 32), random_mask(2, 64, 0.5, torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 1000])
    with torch.no_grad():
        torch.testing.assert_close(again(tokens, mask, labels), model(tokens, mask, labels), rtol=0, atol=0)
    # the published file: torch.save({"model": ..., "model_ema": ...}); EMA preferred
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    torch.save({"model": model.state_dict(), "model_ema": ema}, tmp_path / "checkpoint-last.pth")
    sd = read_state_dict(tmp_path / "checkpoint-last.pth", allow_pickle=True)
    fresh = MAR(model.config)
    load_into(fresh, sd)
    torch.testing.assert_close(fresh.fake_latent, model.fake_latent + 1)


# ------------------------------------------------------------------------------------------------ loss


def test_mask_ratio_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.tensor([sample_mask_ratio(0.7, g) for _ in range(4000)])
    assert r.min() >= 0.7 and r.max() <= 1.0
    # truncated N(1, 0.25) on [0.7, 1]: mean 1 + 0.25 (phi(-1.2) - phi(0)) / (Phi(0) - Phi(-1.2)) = 0.8670
    assert abs(float(r.mean()) - 0.8670) < 0.006
    mask = random_mask(3, 64, 0.71, g)
    assert mask.sum(1).tolist() == [math.ceil(64 * 0.71)] * 3


def test_loss_trains_the_model() -> None:
    torch.manual_seed(0)
    model = create_model("mar-tiny-64x32", attn_dropout=0.0, proj_dropout=0.0).train()
    tokens, labels = torch.randn(2, 64, 32) * 0.5, torch.tensor([1, 2])
    g = torch.Generator().manual_seed(0)
    first = mar_loss(model, tokens, labels, generator=g)
    assert first.loss.isfinite() and 0.7 <= first.mask_ratio <= 1.0
    first.loss.backward()  # adaLN-Zero head: at first only its output layers get gradients
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "diffloss.net.final_layer.linear.weight" in grads
    before = model.z_proj.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        out = mar_loss(model, tokens, labels, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    assert (model.z_proj.weight - before).abs().max() > 0  # the backbone learns too


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_infer_config_from_published_shapes(name: str) -> None:
    cfg = get_config(name)
    assert infer_config(meta_state(cfg)) == cfg
    assert infer_config(meta_state(cfg), num_iter=256).num_iter == 256


def test_infer_config_small() -> None:
    cfg = get_config("mar-s-64x32")
    inferred = infer_config(meta_state(cfg), num_heads=cfg.num_heads, tokenizer=cfg.tokenizer,
                            num_iter=cfg.num_iter, diffusion_steps=cfg.diffusion_steps)
    assert inferred == cfg
    with pytest.raises(ValueError, match="num_heads"):
        infer_config(meta_state(cfg))
