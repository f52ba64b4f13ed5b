"""``python -m training.xqgan.compare``: the XQ-GAN V and SC pipelines at the same token count, each trained
with and without contrastive alignment on the same budget, evaluated on the validation split (issue 12).

The four runs go through the config-driven loop (:func:`training.xqgan.train.train_xqgan`), one after the
other, single-threaded; only ``[model]`` and ``[alignment]`` differ between them:

* **V**: the CNN (``xqgan-v-tiny-64`` at base width 16, ``channel_mult = (1, 1, 2, 2, 4)``: 64 px -> a 4 x 4
  latent map) with a product of P = 2 multi-scale residual quantizers (scales 1, 2, 3, 4; 64 codes of 8
  channels each; XQ-GAN's "MSVR-P2" on the V backbone);
* **SC**: the ViT with learnable query tokens (``imagefolder-tiny-64``: 2 branches x (1 + 4 + 9 + 16) latent
  codes, 64 codes of 8 channels each).

So both give 2 x 30 = 60 integer codes per image from 64-entry codebooks: 360 bits per image, checked before
anything trains (:func:`code_budget`). Alignment ``contrastive`` is the CLIP loss between one quantizer group
(V: the last, SC: the first, as in ``configs/xqgan/``) and the frozen EfficientNet-Lite0 at 128 px, weight 0.1;
``none`` drops it. No discriminator, no LPIPS term (L2 reconstruction + the quantizer losses): the budget is
CPU minutes. The budget is ``--minutes`` of this process's CPU time per run (``run.budget_clock = "cpu"``,
the cosine schedule spans the budget) or a fixed ``--steps``.

Each exported tokenizer is then evaluated by :func:`training.evaluate.eval_tokenizer` on the first ``--n``
validation images, round-tripping through its integer codes (``decode(encode(x))``): PSNR, SSIM,
LPIPS-VGG (rFID with ``--fid``). Beside it: codebook **usage** (the fraction of each group's 64 entries that
occur in the codes of those images) and the **perplexity** of each group's code histogram (of 64; both
averaged over the groups), and a semantic **probe** of the aligned group: the
spatial mean of that group's quantized channels (what the alignment loss sees), nearest class mean (cosine)
over ``--probe-images`` training images, top-1 on the validation images (chance: 1 / 200).

Prints a Markdown table and writes everything (configs, budget, machine, rows) as JSON to ``--out``, updated
after each run; ``--table JSON`` prints the table of a finished comparison again.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from training.data import load_images, to_float
from training.evaluate import eval_tokenizer
from training.xqgan.config import (
    XQGANTrainConfig,
    check_model,
    model_class_and_config,
    parse_config,
    to_dict,
    token_groups,
)
from training.xqgan.losses import pooled_group

# The quantizer both pipelines share: a product of 2 multi-scale residual quantizers over scales 1..4 (the
# latent side), 64 codes of 8 channels each.
QUANTIZER: dict[str, Any] = {"kind": "msrq", "groups": 2, "levels": 1, "codebook_size": 64, "dim": 16}

PIPELINES: dict[str, dict[str, Any]] = {
    "V": {
        "model": {
            "backbone": "v",
            "name": "xqgan-v-tiny-64",
            "overrides": {"base_channels": 16, "channel_mult": (1, 1, 2, 2, 4), "msrq_scales": (1, 2, 3, 4)},
        },
        "align_group": -1,  # XQ-GAN's V pipeline aligns its last group (configs/xqgan/v-lfq-s-64.toml)
    },
    "SC": {
        "model": {"backbone": "sc", "name": "imagefolder-tiny-64"},
        "align_group": 0,  # the SC pipeline's semantic branch is the first (configs/xqgan/sc-*.toml)
    },
}
ALIGNMENTS: tuple[str, ...] = ("none", "contrastive")


def run_doc(pipeline: str, alignment: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """The XQ-GAN config document of one run (the TOML file it would be, as a dict)."""
    spec = PIPELINES[pipeline]
    align: dict[str, Any] = {"kind": "none", "group": spec["align_group"]}
    if alignment == "contrastive":
        align = {"kind": "contrastive", "encoder": "efficientnet-lite0", "weight": 0.1, "temperature": 0.1,
                 "normalize": True, "group": spec["align_group"], "resolution": args.align_resolution}
    return {
        "kind": "xqgan",
        "model": copy.deepcopy(spec["model"]),
        "quantizer": dict(QUANTIZER),
        "alignment": align,
        "discriminator": {"kind": "none"},
        "finetune": {"encoder": "full", "decoder": "full"},
        "loss": {"recon": "l2", "recon_weight": 1.0, "lpips_weight": 0.0, "quantizer_weight": 1.0},
        "data": {"train": args.data, "val": args.val, "image_size": 64, "max_images": args.max_images,
                 "flip": True},
        "optim": {"lr": args.lr, "betas": (0.9, 0.95), "weight_decay": 1e-4, "warmup_steps": args.warmup},
        "run": {
            "out_dir": str(out_dir),
            "steps": args.steps or 10**9,  # with --minutes only, the schedule follows the CPU-time budget
            "max_minutes": args.minutes,
            "budget_clock": "cpu",
            "batch_size": args.batch_size,
            "seed": args.seed,
            "threads": args.threads,
            "device": "cpu",
            "ema_decay": args.ema,
            "log_every": args.log_every or 10**9,
            "ckpt_every": 10**9,
            "ckpt_every_minutes": 1e9,  # one checkpoint, at the end
            "sample_every": 10**9,  # one reconstruction grid, at the end
            "resume": False,
            "progress": "log" if args.log_every else "none",
            "export_dtype": "float32",
        },
    }


def code_budget(cfg: XQGANTrainConfig) -> dict[str, Any]:
    """Codes per image, codebook size and bits per image of the model ``cfg`` describes (built on meta)."""
    cls, mcfg = model_class_and_config(cfg)
    with torch.device("meta"):
        model = cls(mcfg)
    cs = model.code_structure
    codes = math.prod(cs.shape)
    return {"codes_per_image": codes, "code_shape": list(cs.shape), "codebook_size": int(cs.codebook_size),
            "bits_per_image": round(codes * math.log2(cs.codebook_size), 3),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}


def group_codes(model: nn.Module, codes: torch.Tensor) -> list[torch.Tensor]:
    """Per quantizer group, the flat codes: SC (B, G, L) groups on axis 1, V (B, L, Q, G) on the last."""
    cs = model.code_structure
    if cs.group_axis < 0:
        return [codes.reshape(-1)]
    return [codes.select(cs.group_axis, g).reshape(-1) for g in range(cs.groups)]


@torch.no_grad()
def encode_all(model: nn.Module, images: torch.Tensor, group: int, num_groups: int,
               batch_size: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, pooled features (N, d / P) of quantizer group ``group``) of uint8 images."""
    codes, feats = [], []
    for i in range(0, images.shape[0], batch_size):
        enc = model.encode_full(to_float(images[i : i + batch_size]))
        codes.append(enc.codes)
        feats.append(pooled_group(enc.quantized.float(), num_groups, group))
    return torch.cat(codes), torch.cat(feats)


def usage_stats(model: nn.Module, codes: torch.Tensor) -> dict[str, float]:
    """Fraction of each group's codebook that occurs in ``codes`` and the perplexity of its code histogram,
    both averaged over the groups."""
    v = int(model.code_structure.codebook_size)
    used, ppl = [], []
    for c in group_codes(model, codes):
        c = c[c >= 0]
        hist = torch.bincount(c, minlength=v).double()
        p = hist / hist.sum()
        used.append(float((hist > 0).sum()) / v)
        ppl.append(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())))
    return {"usage": sum(used) / len(used), "perplexity": sum(ppl) / len(ppl)}


def nearest_class_mean(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor,
                       val_y: torch.Tensor) -> float:
    """Top-1 of the nearest class mean (cosine) of ``train_f`` on ``val_f``."""
    train_f, val_f = F.normalize(train_f.double(), dim=-1), F.normalize(val_f.double(), dim=-1)
    classes = train_y.unique()
    means = torch.stack([train_f[train_y == c].mean(0) for c in classes])
    pred = classes[(val_f @ F.normalize(means, dim=-1).T).argmax(-1)]
    return float((pred == val_y).double().mean())


def evaluate_run(export: Path, cfg: XQGANTrainConfig, args: argparse.Namespace, val, gallery) -> dict[str, Any]:
    """Metrics of one exported tokenizer (module docstring)."""
    model = models.load_pretrained(export).float().eval()
    res = eval_tokenizer(model, data=args.val, n=args.n, batch_size=50, cache_dir=args.cache,
                         fid=args.fid)
    _, groups = token_groups(model.config)
    codes, val_f = encode_all(model, val.images, cfg.alignment.group, groups)
    out = {**res, **usage_stats(model, codes)}
    if gallery is not None:
        _, gal_f = encode_all(model, gallery.images, cfg.alignment.group, groups)
        out["probe_top1"] = nearest_class_mean(gal_f, gallery.labels, val_f, val.labels)
        out["probe_images"] = len(gallery)
    return out


def train_stats(out_dir: Path) -> dict[str, Any]:
    """Steps, images, CPU and wall seconds of the finished run, from its last checkpoint."""
    state = torch.load(out_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    return {"steps": int(state["step"]), "images_seen": int(state["images_seen"]),
            "cpu_minutes": round(float(state["cpu_elapsed"]) / 60, 2)}


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| pipeline | alignment | codes / image (bits) | params | steps | CPU min | PSNR | SSIM | LPIPS "
            "| usage | perplexity | probe top-1 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['pipeline']} | {r['alignment']} | {r['codes_per_image']} ({r['bits_per_image']:g}) "
            f"| {r['params_m']:.2f} M | {r['steps']} | {r['cpu_minutes']:.2f} | {r['psnr']:.2f} | {r['ssim']:.3f} "
            f"| {r['lpips_vgg16']:.3f} | {100 * r['usage']:.0f}% | {r.get('perplexity', float('nan')):.1f} | "
            + (f"{100 * r['probe_top1']:.1f}%" if "probe_top1" in r else "-")
            + " |"
        )
    if any("rfid" in r for r in rows):
        lines[0] += " rFID |"
        lines[1] += "---|"
        for i, r in enumerate(rows):
            lines[2 + i] += f" {r['rfid']:.1f} |" if "rfid" in r else " - |"
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m training.xqgan.compare", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, help="CPU minutes of training per run (run.budget_clock = cpu)")
    ap.add_argument("--steps", type=int, help="steps per run (the schedule's length; with --minutes, whichever "
                    "comes first)")
    ap.add_argument("--pipelines", default="V,SC", help="comma-separated, from V, SC")
    ap.add_argument("--alignments", default="none,contrastive", help="comma-separated, from none, contrastive")
    ap.add_argument("--data", default="tiny-train", help="training images")
    ap.add_argument("--max-images", type=int, default=5000, help="training images kept (data.max_images)")
    ap.add_argument("--val", default="tiny-val", help="evaluation images")
    ap.add_argument("--n", type=int, default=500, help="validation images evaluated (the first N)")
    ap.add_argument("--probe-images", type=int, default=5000,
                    help="training images for the class-mean probe (0: no probe)")
    ap.add_argument("--fid", action="store_true", help="also rFID (Inception; slow on a CPU)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--ema", type=float, default=0.99, help="EMA decay of the exported weights (0: raw)")
    ap.add_argument("--align-resolution", type=int, default=128, help="frozen EfficientNet-Lite0 input size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50, help="training log lines (0: none)")
    ap.add_argument("--runs-dir", default="runs/xqgan-compare", help="one folder per run (replaced)")
    ap.add_argument("--cache", default="runs/cache", help="cached Inception features (--fid)")
    ap.add_argument("--out", help="write the JSON here (updated after each run)")
    ap.add_argument("--table", metavar="JSON", help="only print the Markdown table of a finished comparison")
    args = ap.parse_args(argv)
    if args.table:
        return args
    if not args.minutes and not args.steps:
        ap.error("give a budget: --minutes (CPU minutes per run) and / or --steps")
    args.pipelines = [p.strip().upper() for p in args.pipelines.split(",") if p.strip()]
    args.alignments = [a.strip() for a in args.alignments.split(",") if a.strip()]
    for p in args.pipelines:
        if p not in PIPELINES:
            ap.error(f"--pipelines: {p!r} is not one of {list(PIPELINES)}")
    for a in args.alignments:
        if a not in ALIGNMENTS:
            ap.error(f"--alignments: {a!r} is not one of {list(ALIGNMENTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())["rows"]))
        return 0
    torch.set_num_threads(args.threads)
    runs_dir = Path(args.runs_dir)
    plan = []
    for p in args.pipelines:
        for a in args.alignments:
            doc = run_doc(p, a, args, runs_dir / f"{p.lower()}-{a}")
            cfg = parse_config(doc)
            check_model(cfg)
            plan.append((p, a, cfg, code_budget(cfg)))
    budgets = {(b["codes_per_image"], b["bits_per_image"]) for *_, b in plan}
    if len(budgets) != 1:
        raise SystemExit(f"the pipelines give different token counts: "
                         f"{ {f'{p}/{a}': b['codes_per_image'] for p, a, _, b in plan} }")
    codes, bits = budgets.pop()
    print(f"{len(plan)} runs at {codes} codes / image ({bits:g} bits); budget "
          f"{args.minutes or '-'} CPU min, {args.steps or '-'} steps; {args.threads} thread(s)", flush=True)
    val = load_images(args.val, 64, max_images=args.n)
    gallery = load_images(args.data, 64, max_images=args.probe_images) if args.probe_images else None
    result: dict[str, Any] = {
        "command": "python -m training.xqgan.compare " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": args.threads},
        "budget": {"cpu_minutes_per_run": args.minutes, "steps_per_run": args.steps, "batch_size": args.batch_size,
                   "train": args.data, "max_images": args.max_images, "lr": args.lr, "warmup": args.warmup,
                   "ema": args.ema},
        "tokens": {"codes_per_image": codes, "bits_per_image": bits, "quantizer": QUANTIZER,
                   "matched": "integer codes per image and codebook size (so bits per image too)"},
        "eval": {"data": args.val, "n": len(val), "fid": args.fid, "probe_images": len(gallery) if gallery else 0,
                 "round_trip": "decode(encode(x))"},
        "rows": [],
    }
    for p, a, cfg, budget in plan:
        out_dir = Path(cfg.run.out_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)  # a fresh run: no resume from an earlier comparison
        print(f"== {p} / alignment {a}: training into {out_dir}", flush=True)
        from training.xqgan.train import train_xqgan

        t0 = time.time()
        export = train_xqgan(cfg)
        wall = time.time() - t0
        stats = train_stats(out_dir)
        t1 = time.time()
        metrics = evaluate_run(export, cfg, args, val, gallery)
        row = {"pipeline": p, "alignment": a, **budget, **stats, "train_wall_minutes": round(wall / 60, 2),
               **metrics, "eval_wall_minutes": round((time.time() - t1) / 60, 2), "export": str(export),
               "config": to_dict(cfg)}
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
        result["markdown"] = markdown(result["rows"])
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(result["markdown"], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
