"""VAR: the published d17 key layout and size (meta device), the KV-cached scale pass against the
teacher-forced pass, and the step sampler (valid codes, guidance, top-k / top-p, batch independence)."""

from __future__ import annotations

import pytest
import torch

from models.hub import load_into, load_pretrained, save_pretrained
from models.imagefolder import ImageFolderModel
from models.registry import config_from_dict, config_to_dict, create_model, describe, get_config, list_models
from models.sampling.base import run_to_completion
from models.sampling.var import VARSampler, VARSampleRequest, filter_top_k_top_p, sample_codes
from models.var import VAR, count_params, tokenizer_matches

TINY_TOK, TINY_VAR = "imagefolder-tiny-64", "var-tiny-64"


def _expected_d17() -> dict[str, tuple[int, ...]]:
    """FORMATS.md 2.3, written out for depth 17 (C = 1088, 17 heads, 2 x 4096 codes, Cvae 64, L 286)."""
    C, L = 1088, 286
    out = {"pos_start": (1, 1, C), "pos_1LC": (1, L, C), "lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L),
           "word_embed.weight": (C, 64), "word_embed.bias": (C,), "class_emb.weight": (1001, C),
           "lvl_embed.weight": (10, C), "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
           "head.weight": (8192, C), "head.bias": (8192,)}
    for i in range(17):
        b = f"blocks.{i}"
        out |= {f"{b}.attn.scale_mul_1H11": (1, 17, 1, 1), f"{b}.attn.q_bias": (C,), f"{b}.attn.v_bias": (C,),
                f"{b}.attn.zero_k_bias": (C,), f"{b}.attn.mat_qkv.weight": (3 * C, C),
                f"{b}.attn.proj.weight": (C, C), f"{b}.attn.proj.bias": (C,),
                f"{b}.ffn.fc1.weight": (4 * C, C), f"{b}.ffn.fc1.bias": (4 * C,), f"{b}.ffn.fc2.weight": (C, 4 * C),
                f"{b}.ffn.fc2.bias": (C,), f"{b}.ada_lin.1.weight": (6 * C, C), f"{b}.ada_lin.1.bias": (6 * C,)}
    return out


def test_published_d17_layout_and_size() -> None:
    cfg = get_config("var-d17-msvr10p2-4096")
    assert (cfg.depth, cfg.width, cfg.num_heads, cfg.num_tokens, cfg.vocab_size) == (17, 1088, 17, 286, 8192)
    assert (cfg.cfg_scale, cfg.top_k, cfg.top_p) == (3.25, 750, 0.95)  # README inference recipe
    with torch.device("meta"):
        model = VAR(cfg)
    sd = model.state_dict()
    shapes = {k: tuple(t.shape) for k, t in sd.items()}
    expected = _expected_d17()
    assert len(sd) == 233 and sorted(set(shapes) ^ set(expected)) == [] and shapes == expected
    n = count_params(cfg)
    assert n == 375_258_593 and round(n / 1e6, 1) == 375.3  # FORMATS.md 2.2: "375.3 M"
    assert sd["lvl_1L"].dtype == torch.long
    load_into(model, {**sd, "empty_emb.weight": torch.empty(1, 1088, device="meta")})  # mlm variant: ignored
    tok = get_config(cfg.tokenizer)
    assert tokenizer_matches(cfg, tok) and tokenizer_matches(get_config(TINY_VAR), get_config(TINY_TOK))
    assert not tokenizer_matches(cfg, get_config("imagefolder-msvr10p2-8192"))


def test_registry_and_config_json() -> None:
    assert {"var-d17-msvr10p2-4096", TINY_VAR} <= set(list_models("var"))
    for name in ("var-d17-msvr10p2-4096", TINY_VAR):
        assert describe(name)
        with torch.device("meta"):
            model = create_model(name)
        cls, back = config_from_dict(config_to_dict(model))
        assert cls is VAR and back == model.config


# ------------------------------------------------------------------------------------------- numerics


@pytest.fixture(scope="module")
def pair() -> tuple[ImageFolderModel, VAR]:
    """The tiny tokenizer and generator in float64 (exactness), with weights far from their init."""
    torch.manual_seed(0)
    tok = create_model(TINY_TOK).eval().double()
    var = create_model(TINY_VAR).eval().double()
    with torch.no_grad():
        for p in var.parameters():  # the published init makes the blocks near-identity; shake them up
            p.add_(torch.randn_like(p) * 0.05)
        var.head.weight.mul_(40.0)  # peaky logits, so guidance and filtering visibly matter
    return tok, var  # type: ignore[return-value]


def _random_codes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (n, 2, 30), generator=torch.Generator().manual_seed(seed))


def test_buffers_are_block_causal() -> None:
    var = create_model(TINY_VAR)
    lvl = var.lvl_1L[0]
    assert lvl.tolist() == [0] + [1] * 4 + [2] * 9 + [3] * 16
    bias = var.attn_bias_for_masking[0, 0]
    sees = bias == 0
    assert torch.equal(sees, lvl[:, None] >= lvl[None, :])
    assert bool(torch.isinf(bias[~sees]).all()) and bool((bias[~sees] < 0).all())


def test_kv_cached_scales_match_teacher_forcing(pair: tuple[ImageFolderModel, VAR]) -> None:
    tok, var = pair
    codes = _random_codes(3, 1)
    labels = torch.tensor([3, 7, 1000])
    with torch.no_grad():
        full = var(labels, tok.teacher_forcing_input(codes))  # (3, 30, 128)
        assert full.shape == (3, 30, 128)
        f_hat = torch.zeros(3, 16, 4, 4, dtype=torch.float64)
        past, token_map, parts = None, None, []
        for si, (b, e) in enumerate(var.config.scale_slices()):
            out = var.forward_scale(si, labels, token_map, past)
            parts.append(out.logits)
            assert out.cache[0][0].shape == (3, 2, e, 32)
            past = out.cache
            f_hat, nxt = tok.next_scale_input(si, f_hat, codes[:, :, b:e])
            token_map = nxt.flatten(2).transpose(1, 2)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-9, rtol=1e-9)


def test_teacher_forcing_is_causal_over_scales(pair: tuple[ImageFolderModel, VAR]) -> None:
    tok, var = pair
    codes = _random_codes(1, 2)
    changed = codes.clone()
    changed[:, :, 14:] = (changed[:, :, 14:] + 1) % 64  # the last scale's codes
    with torch.no_grad():
        a = var(torch.tensor([5]), tok.teacher_forcing_input(codes))
        b = var(torch.tensor([5]), tok.teacher_forcing_input(changed))
    assert torch.equal(a, b)  # the last scale's codes are never an input
    changed[:, :, 5:14] = (changed[:, :, 5:14] + 1) % 64  # scale 2's codes feed scale 3's positions only
    with torch.no_grad():
        c = var(torch.tensor([5]), tok.teacher_forcing_input(changed))
    assert torch.equal(a[:, :14], c[:, :14]) and not torch.equal(a[:, 14:], c[:, 14:])


def _sampler(tok: ImageFolderModel, var: VAR, **kw) -> VARSampler:
    return VARSampler.from_config(var.config, tok, dtype=torch.float64, **kw)


def _req(cls: int, seed: int, cfg: float = 1.5, **kw) -> VARSampleRequest:
    return VARSampleRequest(class_id=cls, seed=seed, steps=4, cfg_scale=cfg, **kw)


def test_sampling_gives_valid_codes_that_decode(pair: tuple[ImageFolderModel, VAR]) -> None:
    tok, var = pair
    sampler = _sampler(tok, var)
    codes = run_to_completion(sampler, var, [_req(1, 0), _req(2, 1, top_k=5), _req(3, 2, top_p=0.5)], (2, 30))
    assert codes.shape == (3, 2, 30) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    assert len({tuple(c.flatten().tolist()) for c in codes}) == 3
    with torch.no_grad():
        images = tok.decode(codes)
    assert images.shape == (3, 3, 64, 64) and float(images.abs().max()) <= 1.0
    # the f_hat a row built step by step is the tokenizer's f_hat of its codes
    row = sampler.init_row(_req(4, 3), (2, 30))
    while not row.done:
        sampler.step(var, [row])
    torch.testing.assert_close(row.state["f_hat"][None], tok.codes_to_fhat(row.x[None]), atol=1e-12, rtol=0)


def test_a_row_samples_the_same_alone_or_batched(pair: tuple[ImageFolderModel, VAR]) -> None:
    tok, var = pair
    sampler = _sampler(tok, var)
    target = _req(207, seed=11, cfg=2.0, top_k=20, top_p=0.9)
    alone = run_to_completion(sampler, var, [target], (2, 30))[0]
    others = [_req(1, 0, cfg=0.0), _req(2, 5, cfg=4.0, guidance_high=0.5), _req(3, 7, top_k=1)]
    batched = run_to_completion(sampler, var, [others[0], target, *others[1:]], (2, 30))[1]
    assert torch.equal(alone, batched)
    # the same row joining a running batch two scales late (it forms its own group until the end)
    rows = [sampler.init_row(r, (2, 30)) for r in others]
    sampler.step(var, rows)
    stats = sampler.step(var, rows)
    assert stats.forwards == 1
    late = sampler.init_row(target, (2, 30))
    rows.append(late)
    stats = sampler.step(var, [r for r in rows if not r.done])
    assert stats.forwards == 2 and stats.rows == 4  # scale 2 for the old rows, scale 0 for the new one
    while not all(r.done for r in rows):
        sampler.step(var, [r for r in rows if not r.done])
    assert torch.equal(late.x, alone)
    # and a different seed gives different codes
    assert not torch.equal(run_to_completion(sampler, var, [_req(207, 12, 2.0, top_k=20, top_p=0.9)],
                                             (2, 30))[0], alone)


def test_greedy_guided_codes_follow_the_teacher_forced_logits(pair: tuple[ImageFolderModel, VAR]) -> None:
    tok, var = pair
    sampler = _sampler(tok, var)
    for cfg in (0.0, 3.0):
        req = _req(42, seed=0, cfg=cfg, top_k=1)
        codes = run_to_completion(sampler, var, [req], (2, 30))
        with torch.no_grad():
            tf = tok.teacher_forcing_input(codes)
            cond = var(torch.tensor([42]), tf)[0]
            uncond = var(torch.tensor([1000]), tf)[0]
        for si, (b, e) in enumerate(var.config.scale_slices()):
            t = cfg * si / 3
            logits = ((1 + t) * cond[b:e] - t * uncond[b:e]).view(e - b, 2, 64)
            assert torch.equal(codes[0, :, b:e], logits.argmax(-1).t()), (cfg, si)


def test_guidance_rows_and_interval(pair: tuple[ImageFolderModel, VAR]) -> None:
    tok, var = pair
    sampler = _sampler(tok, var)

    def uncond_per_step(req: VARSampleRequest) -> list[int]:
        row = sampler.init_row(req, (2, 30))
        counts = []
        while not row.done:
            counts.append(sampler.step(var, [row]).uncond_rows)
        assert row.state["uncond_cache"] is None and row.state["cache"] is None  # freed when done
        return counts

    assert uncond_per_step(_req(1, 0, cfg=0.0)) == [0, 0, 0, 0]
    assert uncond_per_step(_req(1, 0, cfg=2.0)) == [1, 1, 1, 1]
    # progress si/3 in [0, 0.5] applies guidance only at scale 1: the unconditional copy stops after it
    assert uncond_per_step(_req(1, 0, cfg=2.0, guidance_high=0.5)) == [1, 1, 0, 0]
    assert uncond_per_step(_req(1, 0, cfg=2.0, guidance_low=0.9)) == [1, 1, 1, 1]
    # guidance only on scale 1 gives the same codes at scale 0 as unguided, not at scale 1
    a = run_to_completion(sampler, var, [_req(1, 0, cfg=0.0, top_k=1)], (2, 30))
    b = run_to_completion(sampler, var, [_req(1, 0, cfg=50.0, top_k=1, guidance_high=0.5)], (2, 30))
    assert torch.equal(a[..., :1], b[..., :1]) and not torch.equal(a[..., 1:5], b[..., 1:5])


def test_filters_and_inverse_cdf_sampling() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    assert torch.isfinite(filter_top_k_top_p(logits, 2, 0.0)).tolist() == [[False, True, False, True, False]]
    p = logits.softmax(-1)[0]  # sorted: 0.636, 0.234, 0.086, 0.032, 0.012
    kept = torch.isfinite(filter_top_k_top_p(logits, 0, 0.8)).tolist()[0]
    assert kept == [False, True, False, True, False] and float(p[1] + p[3]) > 0.8
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 0.01)).tolist()[0] == [False, True, False, False, False]
    assert torch.equal(filter_top_k_top_p(logits, 0, 0.0), logits)
    # inverse-CDF draws follow the softmax
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    codes = sample_codes(logits.expand(u.shape[0], -1), u)
    freq = torch.bincount(codes, minlength=5).double() / u.shape[0]
    assert float((freq - p.double()).abs().max()) < 0.005
    masked = filter_top_k_top_p(logits, 2, 0.0)
    assert set(sample_codes(masked.expand(1000, -1), u[:1000]).tolist()) == {1, 3}
    top = torch.tensor([1.0 - 2.0**-53], dtype=torch.float64)  # the largest uniform never picks a masked code
    assert sample_codes(logits, top).item() == 4 and sample_codes(masked, top).item() == 3
    assert sample_codes(logits, torch.zeros(1, dtype=torch.float64)).item() == 0


def test_request_validation(pair: tuple[ImageFolderModel, VAR]) -> None:
    tok, var = pair
    sampler = _sampler(tok, var)
    with pytest.raises(ValueError, match="steps"):
        sampler.init_row(VARSampleRequest(class_id=1, seed=0, steps=10), (2, 30))
    with pytest.raises(ValueError, match="rows are"):
        sampler.init_row(_req(1, 0), (2, 29))
    with pytest.raises(ValueError, match="top_k"):
        sampler.init_row(_req(1, 0, top_p=1.5), (2, 30))
    with pytest.raises(ValueError, match="scale 0"):
        var.forward_scale(1, torch.tensor([1]), None, None)


def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(3)
    var = create_model(TINY_VAR).eval()
    back = load_pretrained(save_pretrained(var, tmp_path / "var"))
    assert isinstance(back, VAR) and back.config == var.config
    sd, sd2 = var.state_dict(), back.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    tf = torch.randn(2, 29, 16)
    with torch.no_grad():
        assert torch.equal(back(torch.tensor([1, 2]), tf), var(torch.tensor([1, 2]), tf))


def test_training_mode_drops_labels() -> None:
    torch.manual_seed(0)
    var = create_model(TINY_VAR, cond_drop=1.0).train()
    labels = torch.tensor([1, 2])
    tf = torch.randn(2, 29, 16)
    out = var(labels, tf)
    with torch.no_grad():
        null = var.eval()(torch.tensor([1000, 1000]), tf)
    torch.testing.assert_close(out.detach(), null)
    out.sum().backward()
    assert var.class_emb.weight.grad is not None and var.word_embed.weight.grad is not None
