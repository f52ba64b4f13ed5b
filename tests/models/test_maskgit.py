"""MaskGIT generator and its step sampler: shapes, class dropout, the masked-token loss, the cosine schedule,
confidence-based decoding, guidance packing, batch independence and save/load. Tiny sizes, CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import models.coda  # noqa: F401  (registers the coda-* names the generators pair with)
from models.hub import load_pretrained, save_pretrained
from models.maskgit import MaskGIT, MaskGITConfig, cosine_mask, maskgit_loss
from models.registry import create_model, get_config, list_models
from models.sampling.base import SampleRequest, run_to_completion
from models.sampling.mar import masked_count
from models.sampling.maskgit import MaskGITSampler, MaskGITSampleRequest

L, V, K = 30, 64, 10  # tokens, codebook, classes of the test model


@pytest.fixture(scope="module")
def model() -> MaskGIT:
    torch.manual_seed(0)
    return create_model("maskgit-tiny", num_tokens=L, codebook_size=V, num_classes=K).eval()


def test_named_configs_pair_with_the_coda_tokenizer() -> None:
    assert {"maskgit-tiny", "maskgit-s"} <= set(list_models("maskgit"))
    for name in ("maskgit-tiny", "maskgit-s"):
        g = get_config(name)
        tok = get_config(g.tokenizer)
        assert (g.num_tokens, g.codebook_size) == (tok.num_tokens, tok.codebook_size), name
    assert get_config("maskgit-s").sampler == "maskgit"
    with pytest.raises(ValueError):
        MaskGITConfig(cfg_schedule="cosine")


def test_forward_shapes_and_class_dropout(model: MaskGIT) -> None:
    codes = torch.randint(0, V + 1, (3, L))
    labels = torch.tensor([0, 5, K])
    with torch.no_grad():
        logits = model(codes, labels)
        assert logits.shape == (3, L, V)
        dropped = model(codes, labels, force_drop=torch.tensor([True, False, False]))
        null = model(codes, torch.tensor([K, 5, K]))
    assert torch.equal(dropped, null) and not torch.allclose(dropped[0], logits[0])
    with pytest.raises(ValueError):
        model(codes[:, :-1], labels)
    model.train()
    try:
        big = torch.zeros(4000, dtype=torch.long)
        frac = (model.class_labels(big) == K).float().mean().item()
        assert abs(frac - model.config.class_dropout_prob) < 0.03
    finally:
        model.eval()


def test_cosine_mask_and_loss(model: MaskGIT) -> None:
    g = torch.Generator().manual_seed(0)
    mask = cosine_mask(512, L, g)
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= L
    # E[cos(pi/2 u)] = 2/pi of the tokens masked on average
    assert abs(counts.float().mean().item() / L - 2 / math.pi) < 0.05
    torch.manual_seed(1)
    net = create_model("maskgit-tiny", num_tokens=L, codebook_size=V, num_classes=K).train()
    codes = torch.randint(0, V, (4, L))
    out = maskgit_loss(net, codes, torch.tensor([1, 2, 3, 4]), generator=g)
    assert math.isfinite(out.loss.item()) and 0 < out.mask_ratio <= 1
    out.loss.backward()
    assert net.token_emb.weight.grad is not None and net.head.weight.grad.abs().sum() > 0
    # only hidden positions are scored: with nothing hidden but one position, the loss is that position's CE
    one = torch.zeros(1, L, dtype=torch.bool)
    one[0, 7] = True
    net.eval()
    res = maskgit_loss(net, codes[:1], torch.tensor([1]), mask=one)
    inputs = codes[:1].clone()
    inputs[0, 7] = V
    logits = net(inputs, torch.tensor([1]))[0, 7]
    ce = torch.nn.functional.cross_entropy(logits[None], codes[0, 7:8], label_smoothing=0.1)
    torch.testing.assert_close(res.loss, ce)


def _sampler(**kw) -> MaskGITSampler:
    return MaskGITSampler.from_config(get_config("maskgit-tiny", codebook_size=V, num_classes=K), **kw)


def test_sampling_gives_valid_codes_on_the_cosine_schedule(model: MaskGIT) -> None:
    sampler = _sampler()
    row = sampler.init_row(MaskGITSampleRequest(class_id=3, seed=0, steps=5), (L,))
    assert torch.equal(row.x, torch.full((L,), V))
    masked = []
    while not row.done:
        remaining = int((row.x == V).sum())
        expected = 0 if row.step == row.total - 1 else masked_count(L, row.step, row.total, remaining)
        sampler.step(model, [row])
        masked.append(int((row.x == V).sum()))
        assert masked[-1] == expected
    assert masked[-1] == 0 and masked == sorted(masked, reverse=True)
    codes = sampler.result(row)
    assert codes.dtype == torch.int64 and 0 <= int(codes.min()) and int(codes.max()) < V
    again = run_to_completion(sampler, model, [MaskGITSampleRequest(class_id=3, seed=0, steps=5)], (L,))
    assert torch.equal(again[0], codes)  # same seed, same codes


def test_a_row_gives_the_same_codes_alone_and_in_a_mixed_batch(model: MaskGIT) -> None:
    sampler = _sampler()
    target = SampleRequest(class_id=2, seed=11, steps=6, cfg_scale=3.0, sampler="maskgit")
    alone = run_to_completion(sampler, model, [target], (L,))[0]
    # the batch: two rows that started earlier (so at other iterations), one unguided, one guided
    others = [sampler.init_row(SampleRequest(class_id=7, seed=1, steps=4, sampler="maskgit"), (L,)),
              sampler.init_row(MaskGITSampleRequest(class_id=K, seed=2, steps=9, cfg_scale=2.0,
                                                    cfg_schedule="constant", temperature=0.7), (L,))]
    for _ in range(2):
        sampler.step(model, others)
    rows = [*others, sampler.init_row(target, (L,))]
    uncond = []
    while not rows[-1].done:
        live = [r for r in rows if not r.done]
        stats = sampler.step(model, live)
        assert stats.forwards == 1 and stats.model_rows == stats.rows + stats.uncond_rows
        uncond.append(stats.uncond_rows)
    assert uncond[0] == 2  # only the rows with cfg > 1 got unconditional copies
    assert torch.equal(sampler.result(rows[-1]), alone)


class _ClassVsNull:
    """Conditional rows favour code 1, null-class rows code 0 (logit 1 against 0 for the other codes)."""

    def __call__(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(codes.shape[0], codes.shape[1], V)
        out[labels != K, :, 1] = 1.0
        out[labels == K, :, 0] = 1.0
        return out


def test_guidance_mixes_conditional_and_unconditional_logits() -> None:
    sampler = _sampler()
    reqs = [MaskGITSampleRequest(3, seed, 4, cfg_scale=cfg, cfg_schedule="constant")
            for cfg in (1.0, 5.0) for seed in range(8)]
    codes = run_to_completion(sampler, _ClassVsNull(), reqs, (L,))
    share = (codes == 1).float().mean(dim=1)
    # one draw: unguided p(code 1) = e / (e + 63) ~ 4 %; guided (w = 5: logits 5, -4, 0) ~ 70 %; revealing
    # the confident draws first raises both a little (measured over 40 seeds: 6 % and 88 %)
    assert share[:8].mean() < 0.15 and share[8:].mean() > 0.6


def test_guidance_interval_limits_the_unconditional_copies(model: MaskGIT) -> None:
    sampler = _sampler()
    # the masked fraction before iteration s is the "time": 1 at the start; guide only while it is <= 0.5
    row = sampler.init_row(SampleRequest(1, 0, 4, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.5), (L,))
    seen = []
    while not row.done:
        frac = float((row.x == V).float().mean())
        seen.append((frac <= 0.5, sampler.step(model, [row]).uncond_rows))
    assert [u for _, u in seen] == [int(g) for g, _ in seen] and seen[0] == (False, 0)


class _Peaked:
    """Position i puts logit 12 + i on code i % V and 0 elsewhere: later positions are more confident."""

    def __call__(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, length = codes.shape
        out = torch.zeros(n, length, V)
        pos = torch.arange(length)
        out[:, pos, pos % V] = 12.0 + pos.float()
        return out


def test_the_most_confident_positions_are_revealed_first() -> None:
    sampler = _sampler()
    row = sampler.init_row(MaskGITSampleRequest(0, 0, 4, choice_temperature=0.0), (L,))
    sampler.step(_Peaked(), [row])
    revealed = (row.x != V).nonzero().squeeze(1).tolist()
    n = L - masked_count(L, 0, 4, L)
    assert revealed == list(range(L - n, L))  # the n most confident positions
    assert torch.equal(row.x[revealed], torch.tensor(revealed) % V)
    # with strong Gumbel noise the order is no longer the confidence order
    noisy = sampler.init_row(MaskGITSampleRequest(0, 0, 4, choice_temperature=1e4), (L,))
    sampler.step(_Peaked(), [noisy])
    assert (noisy.x != V).nonzero().squeeze(1).tolist() != revealed


def test_save_load_round_trip(model: MaskGIT, tmp_path: Path) -> None:
    save_pretrained(model, tmp_path / "mg")
    loaded = load_pretrained(tmp_path / "mg")
    assert isinstance(loaded, MaskGIT) and loaded.config == model.config
    codes = torch.randint(0, V + 1, (2, L))
    labels = torch.tensor([1, K])
    with torch.no_grad():
        assert torch.equal(loaded(codes, labels), model(codes, labels))
