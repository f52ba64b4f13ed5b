"""End to end on real images (CPU, tiny models): losses fall, checkpoints resume exactly, exports load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models
from training import config as C
from training.data import load_images, tiny_imagenet_validation, to_float
from training.generator import train_generator
from training.named import get_named
from training.objectives import flow_matching_loss
from training.tokenizer import train_tokenizer

pytestmark = pytest.mark.skipif(not tiny_imagenet_validation()[0].exists(), reason="shared data not present")


def _tok_cfg(out: Path, **run) -> C.TokenizerTrainConfig:
    cfg = get_named("tokenizer-tiny")
    return C.apply_overrides(cfg, [
        f"run.out_dir={out}", "run.sample_every=30", "run.ckpt_every=100", "data.max_images=192",
        "run.progress=none", *[f"run.{k}={json.dumps(v)}" for k, v in run.items()],
    ])


def _gen_cfg(out: Path, tokenizer: Path, model: str = "sit-tiny-64x32", *extra: str, **run) -> C.GeneratorTrainConfig:
    cfg = get_named("generator-tiny")
    return C.apply_overrides(cfg, [*extra,
        f"model={model}", f"tokenizer={tokenizer}", f"run.out_dir={out}", "run.sample_every=60", "run.ckpt_every=100", "run.progress=none", "data.max_images=192", "sample_steps=4",
        f"latent_cache={out.parent / 'latents.pt'}", *[f"run.{k}={json.dumps(v)}" for k, v in run.items()],
    ])


def _ckpt(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "run"
    train_tokenizer(_tok_cfg(out))
    return out


def test_tokenizer_learns_and_exports(tokenizer_run: Path) -> None:
    rows = [json.loads(x) for x in (tokenizer_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rec" in r]
    assert {"rec", "lpips", "kl", "align", "loss", "grad_norm"} <= set(steps[0])
    assert any("d_loss" in r and "g_loss" in r for r in steps), "the discriminator switches on at disc_start"
    tok = models.load_pretrained(tokenizer_run / "export")
    cfg = json.loads((tokenizer_run / "export" / "config.json").read_text())
    assert cfg["class_name"] == "SoftVQModel" and "tiny-val" in cfg["trained_on"]
    assert (tokenizer_run / "loss.png").exists() and list((tokenizer_run / "samples").glob("recon_*.png"))
    torch.manual_seed(0)
    fresh = models.create_model("softvq-tiny-64").eval()
    x = to_float(load_images("tiny-val", 64, max_images=16).images)  # the images it trained on
    with torch.no_grad():
        before = (fresh.decode(fresh.encode(x)) - x).abs().mean()
        after = (tok.decode(tok.encode(x)) - x).abs().mean()
    assert after < 0.9 * before, (float(before), float(after))


def test_resuming_a_finished_tokenizer_run_answers_before_loading_images(tokenizer_run: Path, capsys) -> None:
    export = tokenizer_run / "export"
    before = {p.name: p.stat().st_mtime_ns for p in export.iterdir()}
    cfg = C.apply_overrides(_tok_cfg(tokenizer_run), ["data.train=/no/such/images"])  # loading would fail
    assert train_tokenizer(cfg) == export
    assert "already finished" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in export.iterdir()} == before  # not exported again


def test_tokenizer_resume_is_exact(tokenizer_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    train_tokenizer(_tok_cfg(out, stop_at=12))
    assert _ckpt(out)["step"] == 12
    train_tokenizer(_tok_cfg(out))
    a, b = _ckpt(tokenizer_run), _ckpt(out)
    assert b["step"] == 30
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6)
    for k in a["extra"]["disc"]:
        torch.testing.assert_close(b["extra"]["disc"][k], a["extra"]["disc"][k], rtol=1e-5, atol=1e-6)
    events = [json.loads(x).get("event") for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "resume" in events


@pytest.mark.parametrize("model", ["sit-tiny-64x32", "dit-tiny-64x32"])
def test_generator_learns_resumes_and_exports(tokenizer_run: Path, tmp_path: Path, model: str) -> None:
    tok_dir = tmp_path / "tok"
    models.save_pretrained(models.load_pretrained(tokenizer_run / "export"), tok_dir)
    wip = tmp_path / "wip"
    full = train_generator(_gen_cfg(tmp_path / "full", tok_dir, model, f"wip_dir={wip}"))
    tok_cfg = json.loads((tok_dir / "config.json").read_text())
    assert tok_cfg["vq_std"] != 1.0 and tok_cfg["vq_std"] > 0, "latent stats are written into the tokenizer"

    gen = models.load_pretrained(full)
    # the tokenizer it was trained on, as the server names that folder and by the sha256 of its weights
    assert gen.config.tokenizer == "tok" and gen.config.tokenizer_sha256 == models.hub.weights_sha256(tok_dir)
    labels = load_images("tiny-val", 64, max_images=192).labels
    assert list(gen.config.trained_classes) == sorted(set(labels.tolist()))

    # the loss on a fixed batch falls from the initial weights
    tok = models.load_pretrained(tok_dir)
    z = tok.normalize_latents(torch.load(tmp_path / "latents.pt", weights_only=True)["tokens"][:64].float())
    y = labels[:64]
    g = torch.Generator().manual_seed(5)
    noise, t = torch.randn(z.shape, generator=g), torch.rand(64, generator=g)
    torch.manual_seed(0)
    fresh = models.create_model(model, trained_classes=gen.config.trained_classes).eval()
    raw = models.create_model(model, trained_classes=gen.config.trained_classes).eval()
    raw.load_state_dict(_ckpt(tmp_path / "full")["model"])
    with torch.no_grad():
        if model.startswith("sit"):
            before, after = (flow_matching_loss(m, z, y, t, noise) for m in (fresh, raw))
        else:
            from models.sampling.diffusion import create_diffusion
            from training.objectives import diffusion_loss

            k = (t * 999).long()
            before, after = (diffusion_loss(m, create_diffusion(""), z, y, k, noise, True)["mse"] for m in (fresh, raw))
    assert after < 0.9 * before, (float(before), float(after))

    # interrupted at step 25 and resumed: the same weights as the uninterrupted run
    part = tmp_path / "part"
    train_generator(_gen_cfg(part, tok_dir, model, stop_at=25))
    train_generator(_gen_cfg(part, tok_dir, model))
    a, b = _ckpt(tmp_path / "full"), _ckpt(part)
    assert a["step"] == b["step"] == 60
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-6)
    for key in a["ema"]["model"]:
        torch.testing.assert_close(b["ema"]["model"][key], a["ema"]["model"][key], rtol=1e-5, atol=1e-6)

    # the committable wip folder written at the sample step continues a run in a fresh folder (a later session)
    assert json.loads((wip / "wip.json").read_text())["step"] == 60
    later = tmp_path / "later"
    train_generator(_gen_cfg(later, tok_dir, model, f"run.resume_from={wip}", steps=64))
    events = [json.loads(line) for line in (later / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume_wip" and e["step"] == 60 for e in events)
    assert _ckpt(later)["step"] == 64
