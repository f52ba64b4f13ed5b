"""MAR generator training end to end on real images (CPU, mar-tiny on a tiny tokenizer's latents): the `mar`
command trains, the loss falls, an interrupted run resumes to the same weights, the export loads and samples
with MARSampler, and eval-generator / figures run on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models
from models.hub import weights_sha256
from models.sampling import run_to_completion
from models.sampling.mar import MARSampler, MARSampleRequest, mar_loss
from training.__main__ import main
from training.data import tiny_imagenet_validation

pytestmark = pytest.mark.skipif(not tiny_imagenet_validation()[0].exists(), reason="shared data not present")

STEPS = 30


def _args(out: Path, tok: Path, *extra: str) -> list[str]:
    # the first two Tiny ImageNet validation classes (100 images), latents cached beside the run folders
    return ["mar", "--config", "mar-tiny", "--tokenizer", str(tok), "--out", str(out), "--steps", str(STEPS),
            "data.num_classes=2", "run.progress=none", f"run.sample_every={STEPS}", "run.ckpt_every=100",
            "sample_steps=2", f"latent_cache={out.parent / 'latents.pt'}", *extra]


def _ckpt(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mar")
    torch.manual_seed(0)
    tok = root / "tokenizer"
    models.save_pretrained(models.create_model("softvq-tiny-64"), tok)
    assert main(_args(root / "full", tok)) == 0
    return root, tok


def test_mar_trains_resumes_and_exports(run: tuple[Path, Path]) -> None:
    root, tok = run
    full = root / "full"
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert {"loss", "mse", "vb", "mask_ratio", "grad_norm", "img_per_s"} <= set(steps[0])
    assert all(0.7 <= r["mask_ratio"] <= 1.0 for r in steps)
    assert any(r.get("event") == "export" for r in rows)
    assert list((full / "samples").glob("samples_*.png")) and (full / "loss.png").exists()
    assert json.loads((tok / "config.json").read_text())["vq_std"] != 1.0, "latent stats are written"

    gen = models.load_pretrained(full / "export").float()
    cfg = json.loads((full / "export" / "config.json").read_text())
    # the tokenizer as the server will name it (<parent>-tokenizer) and the sha256 of its weights, so the server
    # pairs the MAR with the tokenizer it was trained on
    assert cfg["class_name"] == "MAR" and cfg["tokenizer"] == f"{tok.parent.name}-tokenizer"
    assert cfg["tokenizer_sha256"] == weights_sha256(tok)
    labels = torch.load(root / "latents.pt", weights_only=True)["labels"]
    assert list(gen.config.trained_classes) == sorted(set(labels.tolist())) and len(gen.config.trained_classes) == 2

    # the loss on a fixed batch (same mask, steps and noise) falls from the initial weights
    tokenizer = models.load_pretrained(tok)
    z = tokenizer.normalize_latents(torch.load(root / "latents.pt", weights_only=True)["tokens"][:64].float())
    y = labels[:64]
    torch.manual_seed(0)
    fresh = models.create_model("mar-tiny-64x32", trained_classes=gen.config.trained_classes).eval()
    raw = models.create_model("mar-tiny-64x32", trained_classes=gen.config.trained_classes).eval()
    raw.load_state_dict(_ckpt(full)["model"])
    with torch.no_grad():
        before, after = (float(mar_loss(m, z, y, generator=torch.Generator().manual_seed(5)).loss)
                         for m in (fresh, raw))
    assert after < 0.9 * before, (before, after)

    # interrupted at step 12 and resumed: the same weights and EMA as the uninterrupted run
    part = root / "part"
    assert main(_args(part, tok, "run.stop_at=12")) == 0
    assert _ckpt(part)["step"] == 12
    assert main(_args(part, tok)) == 0
    a, b = _ckpt(full), _ckpt(part)
    assert a["step"] == b["step"] == STEPS
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-6)
    for key in a["ema"]["model"]:
        torch.testing.assert_close(b["ema"]["model"][key], a["ema"]["model"][key], rtol=1e-5, atol=1e-6)

    # the export samples with MARSampler (its config's defaults) into images the tokenizer decodes
    reqs = [MARSampleRequest(class_id=c, seed=i, steps=2, cfg_scale=2.0) for i, c in enumerate(cfg["trained_classes"])]
    lat = run_to_completion(MARSampler.from_config(gen.config), gen, reqs, (64, 32)).float()
    assert lat.shape == (2, 64, 32) and torch.isfinite(lat).all() and lat.std() > 0.1
    assert tokenizer.decode(tokenizer.denormalize_latents(lat)).shape == (2, 3, 64, 64)


def test_mar_command_refuses_other_families(run: tuple[Path, Path], capsys) -> None:
    root, tok = run
    assert main(["mar", "--config", "generator-tiny", "--tokenizer", str(tok), "--out", str(root / "x")]) == 2
    assert "config error: model = 'sit-tiny-64x32' is not a MAR" in capsys.readouterr().err
    assert not (root / "x").exists()  # refused before anything was loaded or written


def test_eval_generator_and_figures_on_mar(run: tuple[Path, Path]) -> None:
    root, tok = run
    export, out = root / "full" / "export", root / "eval.json"
    assert main(["eval-generator", "--model", str(export), "--tokenizer", str(tok), "--per-class", "2",
                 "--cfg", "2.0", "--steps", "2", "--ref-n", "8", "--no-fid", "--grid", str(root / "grid.png"),
                 "--out", str(out)]) == 0  # gFID is family-blind (tests/training/test_evaluate.py); its sqrtm is slow
    res = json.loads(out.read_text())
    assert res["sampler"] == "mar" and res["steps"] == 2 and res["classes"] == 2 and res["reference"]["n"] == 8
    assert res["runs"][0]["n"] == 4 and "gfid" not in res["runs"][0] and 0 <= res["runs"][0]["classifier_top1"] <= 1
    assert (root / "grid_cfg2.png").exists()

    from PIL import Image

    from training.figures import write_figures

    paths = write_figures(str(tok), str(export), root / "figs", steps=2, taef2=False)  # sampler: the config's
    assert Image.open(paths[1]).height >= 8 * 64 * 2  # 8 classes of 8 samples, 2x upscaled
