"""A V-pipeline tokenizer (product of two residual LFQ) trained on real Tiny ImageNet images: forward /
backward through the whole objective (contrastive alignment on the real frozen EfficientNet-Lite0, PatchGAN
after its start step), the reconstruction loss falls over 20 steps on 32 images; then the config-driven
loop runs, exports a serving folder, and LoRA fine-tuning of that folder with a frozen decoder exports
merged weights."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

import models
from models.xqgan_cnn import XQGANCNN
from training.xqgan.config import parse_config
from training.xqgan.objective import XQGANObjective

DATA = Path(os.environ.get("TOKSERVE_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
VAL = DATA / "tiny-imagenet-64" / "validation-00000-of-00001.parquet"


def real_images(n: int) -> torch.Tensor:
    """The first ``n`` validation JPEGs, decoded: (n, 3, 64, 64) float32 in [-1, 1]."""
    table = pq.ParquetFile(str(VAL)).read_row_group(0, columns=["image"]).slice(0, n)
    arrays = [
        np.asarray(Image.open(io.BytesIO(row["bytes"])).convert("RGB"))
        for row in table.column("image").to_pylist()
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _doc(out_dir: str = "runs/unused", **sections) -> dict:
    doc = {
        "model": {"backbone": "v", "name": "xqgan-v-tiny-64"},
        "alignment": {"kind": "contrastive", "weight": 0.1, "resolution": 64},
        "discriminator": {"kind": "patchgan", "ndf": 8, "layers": 2, "start": 10, "weight": 0.1},
        "loss": {"recon": "l2", "lpips_weight": 0.0},  # LPIPS-VGG is too slow for this CPU test
        "optim": {"lr": 2e-3, "warmup_steps": 0},
        "data": {"train": "tiny-val", "val": "tiny-val", "max_images": 8},
        "run": {
            "out_dir": out_dir,
            "batch_size": 4,
            "steps": 2,
            "device": "cpu",
            "ema_decay": 0.0,
            "progress": "none",
            "export_dtype": "float32",
            "sample_every": 1000,
            "log_every": 1,
        },
    }
    for k, v in sections.items():
        doc[k] = {**doc.get(k, {}), **v}
    return doc


def test_v_pipeline_loss_falls_on_real_images() -> None:
    x_all = real_images(32)
    assert x_all.shape == (32, 3, 64, 64) and float(x_all.std()) > 0.2
    cfg = parse_config(_doc())
    torch.manual_seed(0)
    model = models.create_model("xqgan-v-tiny-64").train()
    assert (model.config.quantizer, model.config.num_groups, model.config.num_levels) == ("lfq", 2, 2)
    objective = XQGANObjective(cfg, model).train()
    opt = torch.optim.AdamW(
        list(model.parameters()) + objective.model_parameters(), lr=2e-3, betas=(0.9, 0.95)
    )
    dopt = torch.optim.AdamW(objective.disc_parameters(), lr=1e-3, betas=(0.5, 0.9))
    recs: list[float] = []
    for step in range(20):
        x = x_all[(step % 2) * 16 : (step % 2 + 1) * 16]
        loss, x_hat, out = objective.generator_loss(model, x, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            assert model.encoder.conv_in.weight.grad is not None  # straight-through to the encoder
            assert objective.aligner.proj.weight.grad is not None
            assert "g_adv" not in out  # before the discriminator's start step
        opt.step()
        if objective.gan_active(step):
            dl, dout = objective.discriminator_loss(x, x_hat, step)
            dopt.zero_grad(set_to_none=True)
            dl.backward()
            dopt.step()
            assert "g_adv" in out and out["adv_weight"] >= 0
        assert all(np.isfinite(v) for v in out.values())
        recs.append(out["rec"])
    assert np.mean(recs[-2:]) < 0.6 * np.mean(recs[:2]), recs
    model.eval()
    with torch.no_grad():
        codes = model.encode(x_all[:4])
        assert codes.shape == (4, 256, 2, 2)
        torch.testing.assert_close(
            model.decode(codes), model.decode_fhat(model.encode_full(x_all[:4]).quantized), atol=1e-4, rtol=0
        )


def test_sc_pipeline_objective_with_dino_discriminator() -> None:
    x = real_images(4)
    cfg = parse_config(_doc(model={"backbone": "sc", "name": "imagefolder-tiny-64"},
                            alignment={"group": 0},
                            discriminator={"kind": "dino", "start": 0, "resolution": 64, "lecam": 0.001}))
    torch.manual_seed(0)
    model = models.create_model("imagefolder-tiny-64").train()
    objective = XQGANObjective(cfg, model).train()
    loss, x_hat, out = objective.generator_loss(model, x, step=0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert {"rec", "quantizer", "align", "g_adv", "adv_weight"} <= set(out)
    assert model.encoder.latent_tokens.grad is not None
    dl, dout = objective.discriminator_loss(x, x_hat, 0, torch.Generator().manual_seed(1))
    dl.backward()
    assert "lecam" in dout and all(p.grad is not None for p in objective.disc_parameters())
    assert objective.disc_parameters() and all(p.grad is None for p in objective.disc.backbone.parameters())


def test_config_driven_training_and_lora_finetune(tmp_path: Path) -> None:
    from training.xqgan.train import train_xqgan

    first = train_xqgan(parse_config(_doc(str(tmp_path / "full"))))
    tok = models.load_pretrained(first)
    assert isinstance(tok, XQGANCNN)
    assert (tmp_path / "full" / "checkpoints" / "last.pt").exists()
    tuned = train_xqgan(
        parse_config(
            _doc(
                str(tmp_path / "lora"),
                model={"name": "", "init_from": str(first)},
                finetune={"encoder": "lora", "decoder": "frozen", "lora_rank": 2},
                discriminator={"kind": "none"},
                alignment={"kind": "none"},
            )
        )
    )
    tok2 = models.load_pretrained(tuned)
    sd1, sd2 = tok.state_dict(), tok2.state_dict()
    assert set(sd1) == set(sd2)  # adapters merged: the base layout only
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1 if k.startswith("decoder."))  # frozen
    changed = [k for k in sd1 if k.startswith("encoder.") and not torch.equal(sd1[k], sd2[k])]
    assert changed and all(k.endswith(("conv1.weight", "conv2.weight")) for k in changed)  # LoRA targets only
