"""VAR training end to end on real images (CPU, tiny configs): an ImageFolder tokenizer is trained a few steps
with the XQ-GAN SC pipeline, then ``python -m training var`` encodes real images into its multi-scale codes,
learns, resumes exactly and exports a folder that samples through VARSampler and evaluates with
``eval-generator`` (which now also handles MaskGIT and VAR, decoding their codes with the tokenizer's ``decode``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models
from models.imagefolder import ImageFolderModel
from models.sampling import SampleRequest, get_sampler, output_shape, run_to_completion
from models.sampling.var import VARSampler
from training import config as C
from training.__main__ import main
from training.data import load_images, tiny_imagenet_validation, to_float
from training.evaluate import eval_generator, resolve_tokenizer_path
from training.named import get_named
from training.xqgan.config import parse_config
from training.xqgan.train import train_xqgan

pytestmark = pytest.mark.skipif(not tiny_imagenet_validation()[0].exists(), reason="shared data not present")

VAR_STEPS = 30


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _ckpt(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


def _var_args(out: Path, tok: Path, *extra: str) -> list[str]:
    return ["var", "--config=var-tiny", f"--tokenizer={tok}", f"--out={out}", f"--steps={VAR_STEPS}",
            "run.progress=none", f"run.sample_every={VAR_STEPS}", "tokenizer_ref=imagefolder-tiny", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("var")
    tok_cfg = parse_config({
        "model": {"backbone": "sc", "name": "imagefolder-tiny-64"},
        "loss": {"recon": "l2", "lpips_weight": 0.0},
        "optim": {"lr": 2e-3, "warmup_steps": 0},
        "data": {"train": "tiny-val", "val": "tiny-val", "max_images": 32},
        "run": {"out_dir": str(root / "tok"), "batch_size": 8, "steps": 10, "device": "cpu", "ema_decay": 0.0,
                "progress": "none", "export_dtype": "float32", "sample_every": 1000, "threads": 1},
    })
    tok = train_xqgan(tok_cfg)
    assert main(_var_args(root / "var", tok)) == 0
    return {"root": root, "tok": tok, "var": root / "var"}


def test_config_round_trips() -> None:
    for name in ("var-tiny", "var-imagefolder"):
        cfg = get_named(name)
        back = C.from_dict(json.loads(json.dumps(C.to_dict(cfg))))
        assert back == cfg and type(back) is type(cfg)


def test_var_learns_and_exports_a_servable_generator(runs) -> None:
    out, tok_dir = runs["var"], runs["tok"]
    steps = [r for r in _rows(out) if "accuracy" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3, (steps[0], steps[-1])
    evals = [r for r in _rows(out) if r.get("event") == "eval"]
    assert len(evals) == 1 and evals[0]["val_loss"] > 0
    assert list((out / "samples").glob("samples_*.png")) and (out / "loss.png").exists()

    tok = models.load_pretrained(tok_dir).eval()
    assert isinstance(tok, ImageFolderModel)
    images = load_images("tiny-val", 64, max_images=32)
    cached = torch.load(out / "codes.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(cached["codes"][:8], tok.encode(to_float(images.images[:8])))

    gen = models.load_pretrained(out / "export").eval()
    g = gen.config
    assert g.tokenizer == "imagefolder-tiny" and tuple(g.scales) == tuple(tok.config.scales)
    assert (g.num_branches, g.codebook_size, g.code_dim) == (2, 64, 16)
    assert list(g.trained_classes) == sorted(set(images.labels.tolist()))
    sampler = get_sampler("var", gen, tokenizer=tok)
    assert isinstance(sampler, VARSampler)
    reqs = [SampleRequest(class_id=g.trained_classes[i], seed=i, steps=g.num_scales, cfg_scale=1.5, sampler="var")
            for i in range(2)]
    shape, dtype = output_shape(g)
    assert shape == (2, 30) and dtype == "int64"
    codes = run_to_completion(sampler, gen, reqs, shape).long()
    assert codes.shape == (2, 2, 30) and int(codes.min()) >= 0 and int(codes.max()) < 64
    with torch.no_grad():
        x = tok.decode(codes)
    assert x.shape == (2, 3, 64, 64) and torch.isfinite(x).all()


def test_var_resume_is_exact(runs, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    args = _var_args(out, runs["tok"], "val_images=0", f"code_cache={runs['var'] / 'codes.pt'}")
    assert main([*args, "run.stop_at=12"]) == 0
    assert _ckpt(out)["step"] == 12
    assert main(args) == 0
    a, b = _ckpt(runs["var"]), _ckpt(out)
    assert b["step"] == VAR_STEPS
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6)


def test_var_refuses_a_tokenizer_without_scales(tmp_path: Path) -> None:
    single = models.create_model("imagefolder-tiny-64", scales=(4,))
    folder = models.save_pretrained(single, tmp_path / "single")
    with pytest.raises(ValueError, match="multi-scale"):
        main(["var", "--config=var-tiny", f"--tokenizer={folder}", f"--out={tmp_path / 'out'}", "--steps=1",
              "run.progress=none"])


def test_eval_generator_samples_var_codes(runs) -> None:
    res = eval_generator(str(runs["var"] / "export"), tokenizer=str(runs["tok"]), per_class=1, cfg_scales=(1.0,),
                         ref_n=64, fid=False, batch_size=16)
    run = res["runs"][0]
    assert res["steps"] == 4 and res["sampler"] == "var" and run["n"] == res["classes"] > 0
    assert 0.0 <= run["classifier_top1"] <= 1.0 and run["guidance_interval"] == [0.0, 1.0]


def test_tokenizer_ref_resolves_default_names(tmp_path: Path) -> None:
    root = tmp_path / "weights" / "default"
    (root / "imagefolder").mkdir(parents=True)
    (root / "var").mkdir()
    assert resolve_tokenizer_path("default-imagefolder", root / "var") == str(root / "imagefolder")
    with pytest.raises(FileNotFoundError):
        resolve_tokenizer_path("default-nothing", tmp_path / "elsewhere" / "var")
