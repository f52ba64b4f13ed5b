"""CODA and MaskGIT training end to end on real images and the real TAEF2 weights (CPU, tiny configs): the
commands run, learn, resume exactly, share the latent cache, and export folders that load and serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models
from models.coda import CODA
from models.sampling import SampleRequest, get_sampler, run_to_completion
from models.sampling.maskgit import MaskGITSampler
from models.taef2 import DEFAULT_WEIGHTS
from training import config as C
from training.__main__ import main
from training.data import load_images, tiny_imagenet_validation, to_float
from training.named import get_named

pytestmark = pytest.mark.skipif(not (tiny_imagenet_validation()[0].exists() and DEFAULT_WEIGHTS.exists()),
                                reason="shared data / TAEF2 weights not present")

CODA_STEPS, MASKGIT_STEPS = 40, 30


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _ckpt(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


def _coda_args(out: Path, cache: Path, *extra: str) -> list[str]:
    return [f"--out={out}", f"--steps={CODA_STEPS}", "run.progress=none", f"latent_cache={cache}",
            f"run.sample_every={CODA_STEPS}", *extra]


def _maskgit_args(out: Path, tok: Path, cache: Path, *extra: str) -> list[str]:
    return ["maskgit", "--config=maskgit-tiny", f"--tokenizer={tok}", f"--out={out}", f"--steps={MASKGIT_STEPS}",
            "run.progress=none", f"latent_cache={cache}", f"run.sample_every={MASKGIT_STEPS}",
            "tokenizer_ref=coda-taef2", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("discrete")
    cache = root / "latents"
    # the coda run goes through a JSON config file (KINDS round trip) and the CLI
    cfg_file = root / "coda.json"
    cfg_file.write_text(json.dumps(C.to_dict(get_named("coda-tiny"))))
    assert main(["coda", f"--config={cfg_file}", *_coda_args(root / "coda", cache)]) == 0
    after_coda = sorted(cache.glob("*.pt"))
    assert main(_maskgit_args(root / "maskgit", root / "coda" / "export", cache)) == 0
    return {"root": root, "cache": cache, "coda": root / "coda", "maskgit": root / "maskgit",
            "cached": (after_coda, sorted(cache.glob("*.pt")))}


def test_configs_round_trip() -> None:
    for name in ("coda-tiny", "coda-taef2", "coda-taef2-image", "maskgit-tiny", "maskgit-taef2"):
        cfg = get_named(name)
        back = C.from_dict(json.loads(json.dumps(C.to_dict(cfg))))
        assert back == cfg and type(back) is type(cfg)


def test_coda_learns_logs_usage_and_exports(runs) -> None:
    out = runs["coda"]
    steps = [r for r in _rows(out) if "latent_mse" in r]
    assert {"quant", "batch_codes", "alive_codes", "grad_norm", "loss"} <= set(steps[0])
    assert steps[-1]["latent_mse"] < 0.5 * steps[0]["latent_mse"], (steps[0], steps[-1])
    evals = [r for r in _rows(out) if r.get("event") == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == CODA_STEPS  # not twice at the last step
    ev = evals[0]
    assert 0 < ev["codes_used"] <= 64 and len(ev["codes_used_per_scale"]) == 6 and ev["psnr"] > 10
    assert ev["latent_rel_mse"] < 1.0 and ev["vae_psnr"] > ev["psnr"]
    assert list((out / "samples").glob("recon_*.png")) and (out / "loss.png").exists()

    tok = models.load_pretrained(out / "export")
    assert isinstance(tok, CODA) and tok.config.codebook_size == 64 and tok.config.lora_rank == 0
    cfg = json.loads((out / "export" / "config.json").read_text())
    assert "tiny-val" in cfg["trained_on"] and "codes used" in cfg["notes"]
    assert cfg["latent_scale"] != 1.0 and cfg["latent_shift"] != 0.0  # measured latent stats
    x = to_float(load_images("tiny-val", 64, max_images=4).images)
    with torch.no_grad():
        codes = tok.encode(x)
        assert codes.shape == (4, 130) and codes.dtype == torch.int64 and int(codes.max()) < 64
        q = tok.quantize(tok.encode_latents(x))
        torch.testing.assert_close(tok.decode(codes), tok.decode_latents(q.quantized), rtol=0, atol=0)
        assert torch.equal(q.indices, codes)


def test_coda_resume_is_exact(runs, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    args = ["coda", "--config=coda-tiny", *_coda_args(out, runs["cache"], "eval_images=0")]
    assert main([*args, "run.stop_at=15"]) == 0
    assert _ckpt(out)["step"] == 15
    assert main(args) == 0
    a, b = _ckpt(runs["coda"]), _ckpt(out)
    assert b["step"] == CODA_STEPS and "resume" in [r.get("event") for r in _rows(out)]
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6)


def test_maskgit_trains_on_cached_codes_and_exports(runs) -> None:
    out, tok_dir = runs["maskgit"], runs["coda"] / "export"
    # the maskgit run found the training and validation latents in the coda run's cache
    after_coda, after_maskgit = runs["cached"]
    assert len(after_coda) == 2 and after_maskgit == after_coda
    steps = [r for r in _rows(out) if "accuracy" in r]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert any(r.get("event") == "eval" and "val_loss" in r for r in _rows(out))
    assert list((out / "samples").glob("samples_*.png"))

    tok = models.load_pretrained(tok_dir)
    cached = torch.load(out / "codes.pt", weights_only=True)
    images = load_images("tiny-val", 64, max_images=32)
    with torch.no_grad():
        assert torch.equal(cached["codes"][:8], tok.encode(to_float(images.images[:8])))
    gen = models.load_pretrained(out / "export")
    g = gen.config
    assert g.tokenizer == "coda-taef2" and (g.num_tokens, g.codebook_size) == (130, 64)
    assert list(g.trained_classes) == sorted(set(images.labels.tolist()))
    sampler = get_sampler("maskgit", gen)
    assert isinstance(sampler, MaskGITSampler)
    reqs = [SampleRequest(class_id=g.trained_classes[i], seed=i, steps=4, cfg_scale=2.0, sampler="maskgit")
            for i in range(2)]
    codes = run_to_completion(sampler, gen, reqs, (g.num_tokens,)).long()
    assert codes.shape == (2, 130) and int(codes.min()) >= 0 and int(codes.max()) < 64
    with torch.no_grad():
        x = tok.decode(codes)
    assert x.shape == (2, 3, 64, 64) and torch.isfinite(x).all()


def test_maskgit_resume_is_exact(runs, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    args = _maskgit_args(out, runs["coda"] / "export", runs["cache"], "val_images=0",
                         f"code_cache={runs['maskgit'] / 'codes.pt'}")
    assert main([*args, "run.stop_at=12"]) == 0
    assert main(args) == 0
    a, b = _ckpt(runs["maskgit"]), _ckpt(out)
    assert b["step"] == MASKGIT_STEPS
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6)
    for k in a["ema"]["model"]:
        torch.testing.assert_close(b["ema"]["model"][k], a["ema"]["model"][k], rtol=1e-5, atol=1e-6)


def test_image_space_phase_adds_decoder_lora(runs, tmp_path: Path) -> None:
    out = tmp_path / "image"
    assert main(["coda", "--config=coda-tiny", f"--out={out}", "--steps=3", "run.progress=none",
                 f"latent_cache={runs['cache']}", "space=image", f"init_from={runs['coda'] / 'export'}",
                 "model_overrides.lora_rank=2", 'model_overrides.lora_targets=["decoder"]', "run.batch_size=4",
                 "eval_images=0", "optim.lr=1e-2"]) == 0
    assert "image_rec" in _rows(out)[-2] or any("image_rec" in r for r in _rows(out))
    tok = models.load_pretrained(out / "export")
    assert tok.config.lora_rank == 2 and tok.lora_names and all(n.startswith("decoder") for n in tok.lora_names)
    ups = [v for k, v in tok.state_dict().items() if k.endswith("lora_layer.up.weight")]
    assert ups and any(float(u.abs().max()) > 0 for u in ups)  # the adapters moved off their zero init
    src = models.load_pretrained(runs["coda"] / "export")
    enc = {k: v for k, v in tok.state_dict().items() if k.startswith("vae.encoder")}
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in enc.items())  # the encoder stays frozen


def test_eval_generator_samples_maskgit_codes(runs) -> None:
    from training.evaluate import eval_generator

    res = eval_generator(str(runs["maskgit"] / "export"), tokenizer=str(runs["coda"] / "export"), per_class=1,
                         cfg_scales=(2.0,), ref_n=64, fid=False, batch_size=16)
    run = res["runs"][0]
    assert res["sampler"] == "maskgit" and res["steps"] == 4 and run["n"] == res["classes"] > 0
    assert 0.0 <= run["classifier_top1"] <= 1.0
