"""The evaluation commands end to end on tiny inputs (real images, real metric networks, tiny models)."""

from __future__ import annotations

import json

import pytest
import torch

import models
from training.__main__ import main
from training.data import tiny_imagenet_validation

pytestmark = pytest.mark.skipif(not tiny_imagenet_validation()[0].exists(), reason="shared data not present")


def test_eval_tokenizer_taef2_without_fid(tmp_path, capsys) -> None:
    out = tmp_path / "taef2.json"
    assert main(["eval-tokenizer", "--model", "taef2", "--n", "32", "--no-fid", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 32 and res["psnr"] > 20 and 0.5 < res["ssim"] < 1 and 0 < res["lpips_vgg16"] < 0.3
    assert json.loads(capsys.readouterr().out)["psnr"] == res["psnr"]
    # --no-lpips: the same reconstructions' PSNR, no LPIPS (rFID alone after a --no-fid run)
    assert main(["eval-tokenizer", "--model", "taef2", "--n", "32", "--no-fid", "--no-lpips", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["psnr"] == res["psnr"] and "lpips_vgg16" not in again


def test_latent_stats_and_generator_eval(tmp_path) -> None:
    torch.manual_seed(0)
    tok_dir, gen_dir = tmp_path / "tokenizer", tmp_path / "generator"
    models.save_pretrained(models.create_model("softvq-tiny-64"), tok_dir)
    assert main(["compute-latent-stats", "--tokenizer", str(tok_dir), "--data", "tiny-val", "--n", "24"]) == 0
    cfg = json.loads((tok_dir / "config.json").read_text())
    assert cfg["vq_std"] > 0 and cfg["vq_std"] != 1.0 and cfg["vq_mean"] != 0.0
    models.save_pretrained(models.create_model("sit-tiny-64x32", trained_classes=(1, 25), tokenizer="default-tokenizer"),
                           gen_dir)
    out = tmp_path / "gen.json"
    assert main(["eval-generator", "--model", str(gen_dir), "--per-class", "2", "--cfg", "1.0", "--cfg", "2.0",
                 "--steps", "2", "--sampler", "euler", "--ref-n", "12", "--cache", str(tmp_path / "cache"),
                 "--grid", str(tmp_path / "grid.png"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["classes"] == 2 and [r["cfg_scale"] for r in res["runs"]] == [1.0, 2.0]
    assert all(r["n"] == 4 and r["gfid"] > 0 and 0 <= r["classifier_top1"] <= 1 for r in res["runs"])
    assert res["reference"]["n"] == 12 and 0 <= res["classifier_top1_real"] <= 1
    assert (tmp_path / "grid_cfg2.png").exists()
    assert list((tmp_path / "cache").glob("inception_*.pt"))


def test_figures_command_writes_both_grids(tmp_path) -> None:
    torch.manual_seed(0)
    tok_dir, gen_dir = tmp_path / "tokenizer", tmp_path / "generator"
    models.save_pretrained(models.create_model("softvq-tiny-64"), tok_dir)
    models.save_pretrained(models.create_model("sit-tiny-64x32"), gen_dir)
    assert main(["figures", "--tokenizer", str(tok_dir), "--generator", str(gen_dir), "--out", str(tmp_path),
                 "--steps", "2"]) == 0
    from PIL import Image

    recon, samples = Image.open(tmp_path / "reconstructions.png"), Image.open(tmp_path / "samples.png")
    row = 64 * 2  # 2x upscaled rows, plus the grid's padding
    assert 3 * row <= recon.height < 4 * row  # original, default tokenizer, TAEF2
    assert 8 * row <= samples.height < 9 * row and samples.width > 8 * row  # 8 classes of 8 samples


def test_eval_tokenizer_reports_codebook_usage_of_a_discrete_tokenizer(tmp_path) -> None:
    from training.evaluate import codebook_usage

    torch.manual_seed(0)
    folder = models.save_pretrained(models.create_model("imagefolder-tiny-64"), tmp_path / "imagefolder")
    out = tmp_path / "if.json"
    assert main(["eval-tokenizer", "--model", str(folder), "--n", "16", "--no-fid", "--out", str(out)]) == 0
    use = json.loads(out.read_text())["codebook_usage"]
    assert use["codebook_size"] == 64 and 1 <= use["codes_used"] <= 64 and len(use["per_branch"]) == 2
    assert all(1 <= b["codes_used"] <= use["codes_used"] for b in use["per_branch"])
    # the definition: distinct codes, and exp(entropy) of the histogram
    u = codebook_usage(torch.tensor([[0, 0, 1, 3]]), 8)
    assert u["codes_used"] == 3 and abs(u["perplexity"] - 2.0 ** 1.5) < 0.05 and "per_branch" not in u
