"""``python -m training.xqgan.compare`` end to end on real Tiny ImageNet images at a tiny budget: four runs
(V / SC x none / contrastive) of 2 steps each, every one exported and evaluated on 8 validation images through
its integer codes; the Markdown table and the JSON agree, and both pipelines give the same token count."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from models.surface import CodeStructure
from training.xqgan.compare import (
    PIPELINES,
    code_budget,
    main,
    markdown,
    nearest_class_mean,
    run_doc,
    usage_stats,
)
from training.xqgan.config import parse_config


def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    rc = main(["--steps", "2", "--n", "8", "--max-images", "16", "--probe-images", "16", "--batch-size", "4",
               "--log-every", "0", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [(r["pipeline"], r["alignment"]) for r in rows] == [
        ("V", "none"), ("V", "contrastive"), ("SC", "none"), ("SC", "contrastive")]
    assert {r["codes_per_image"] for r in rows} == {60} and {r["bits_per_image"] for r in rows} == {360.0}
    assert res["tokens"]["codes_per_image"] == 60 and res["eval"]["n"] == 8
    for r in rows:
        assert r["steps"] == 2 and r["images_seen"] == 8 and r["n"] == 8
        assert 5 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1 and 0 <= r["lpips_vgg16"] < 2
        assert 0 < r["usage"] <= 1 and 1 <= r["perplexity"] <= 64 and 0 <= r["probe_top1"] <= 1
        assert r["config"]["alignment"]["kind"] == r["alignment"]
        assert r["config"]["discriminator"]["kind"] == "none" and r["config"]["loss"]["lpips_weight"] == 0
        assert (tmp_path / "runs" / f"{r['pipeline'].lower()}-{r['alignment']}" / "export" / "config.json").exists()
    printed = capsys.readouterr().out
    table = printed[printed.index("| pipeline |"):].strip()
    assert table == res["markdown"] and len(table.splitlines()) == 2 + 4
    assert main(["--table", str(out)]) == 0 and capsys.readouterr().out.strip() == table
    assert "| V | contrastive | 60 (360) |" in table and "| SC | none | 60 (360) |" in table


def test_token_counts_match_and_mismatch_is_caught():
    args = argparse.Namespace(align_resolution=128, data="tiny-train", val="tiny-val", max_images=16, lr=5e-4,
                              warmup=0, steps=2, minutes=None, batch_size=4, seed=0, threads=1, ema=0.0,
                              log_every=0)
    budgets = {p: code_budget(parse_config(run_doc(p, "contrastive", args, "runs/unused"))) for p in PIPELINES}
    assert budgets["V"]["code_shape"] == [30, 1, 2] and budgets["SC"]["code_shape"] == [2, 30]
    assert budgets["V"]["bits_per_image"] == budgets["SC"]["bits_per_image"] == 360.0
    doc = run_doc("V", "none", args, "runs/unused")
    doc["quantizer"]["codebook_size"] = 128  # a different vocabulary: 420 bits
    assert code_budget(parse_config(doc))["bits_per_image"] == 420.0


def test_usage_and_probe_on_known_inputs():
    class Fake:  # the SC layout: (B, G, L)
        code_structure = CodeStructure(axes=("branch", "position"), shape=(2, 4), codebook_size=4, code_dim=1,
                                       layout="per branch")

    codes = torch.tensor([[[0, 1, 1, -1], [2, 2, 2, 2]]])
    u = usage_stats(Fake(), codes)
    assert u["usage"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    entropy = -(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3)  # group 0: codes 0, 1, 1 (-1 dropped)
    assert u["perplexity"] == pytest.approx((math.exp(entropy) + 1) / 2)  # group 1: one code, perplexity 1
    train_f = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([3, 3, 7])
    val_f = torch.tensor([[0.2, 1.0], [1.0, 0.3]])
    assert nearest_class_mean(train_f, train_y, val_f, torch.tensor([7, 3])) == 1.0
    assert nearest_class_mean(train_f, train_y, val_f, torch.tensor([3, 3])) == 0.5


def test_markdown_adds_rfid_column():
    row = {"pipeline": "V", "alignment": "none", "codes_per_image": 60, "bits_per_image": 360.0, "params_m": 0.72,
           "steps": 10, "cpu_minutes": 1.0, "psnr": 20.0, "ssim": 0.5, "lpips_vgg16": 0.3, "usage": 0.5}
    assert markdown([row]).splitlines()[2].endswith("| 50% | nan | - |")
    lines = markdown([{**row, "perplexity": 20.0, "rfid": 123.4}]).splitlines()
    assert lines[0].endswith("rFID |") and lines[1].count("---") == 13 and lines[2].endswith("| 20.0 | - | 123.4 |")
