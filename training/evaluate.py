"""Evaluation commands: ``eval-tokenizer``, ``eval-generator``, ``compute-latent-stats``.

* ``eval-tokenizer``: reconstructs N validation images (ADM centre crop to the model's size) and reports
  PSNR and SSIM (uint8), LPIPS-VGG and rFID (Inception features of the reconstructions against those of
  the same N originals). ``--model`` is a serving folder, a registered name, or ``taef2`` (the pretrained
  TAEF2 from ``../shared/weights/taef2``).
* ``eval-generator``: ``--per-class`` samples for each trained class, at each ``--cfg`` scale; gFID against
  the validation images of the trained classes, and the EfficientNet-Lite0 top-1 accuracy on the samples
  (does a sample show its class?) beside the same classifier on the real validation images at the same
  resolution. ``--floor-n`` adds the real-versus-real FID floor (train images against the same reference).
* ``compute-latent-stats``: measures ``vq_mean`` / ``vq_std`` of a tokenizer on training images and writes
  them into its ``config.json``.

Every command prints one JSON object and, with ``--out``, writes it to a file. Inception features of real
images are cached under ``--cache`` (default ``runs/cache``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

import models
from training.data import ImageSet, load_images, select_classes, to_float, to_uint8
from training.metrics import FeatureStats, InceptionFeatures, frechet_distance, psnr, ssim, top1
from training.perceptual import LPIPS, EfficientNetLite0
from training.progress import note, progress

# ---------------------------------------------------------------------------------------------- helpers


def load_tokenizer(spec: str, taef2_weights: str | None = None) -> nn.Module:
    """A serving folder, ``taef2`` (pretrained, from the shared weights) or a registered name."""
    if spec.lower() == "taef2":
        from models.taef2 import DEFAULT_WEIGHTS, TAEF2

        return TAEF2.from_original(taef2_weights or DEFAULT_WEIGHTS)
    if Path(spec).is_dir():
        return models.load_pretrained(spec).float()
    return models.create_model(spec).eval()


def image_size_of(model: nn.Module) -> int:
    return int(getattr(model.config, "image_size", 64))


@torch.no_grad()
def reconstruct(model: nn.Module, images: torch.Tensor, batch_size: int, codes_out: list | None = None,
                desc: str | None = None) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> reconstructed uint8 (N, 3, H, W) through ``decode(encode(x))`` (any tokenizer); a
    discrete tokenizer's integer codes are appended to ``codes_out`` when given. A progress bar named ``desc``."""
    out = []
    with progress(total=images.shape[0], desc=desc) as bar:
        for i in range(0, images.shape[0], batch_size):
            x = to_float(images[i : i + batch_size])
            codes_or_tokens = model.encode(x)
            if codes_out is not None and not codes_or_tokens.is_floating_point():
                codes_out.append(codes_or_tokens.cpu())
            out.append(to_uint8(model.decode(codes_or_tokens)))
            bar.update(x.shape[0])
    return torch.cat(out)


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> dict:
    """Distinct codes and the perplexity of their histogram: in all, and per branch when ``codes`` is
    (N, G, L) (ImageFolder: one codebook per branch)."""
    def one(c: torch.Tensor) -> dict:
        counts = torch.bincount(c.reshape(-1), minlength=codebook_size).double()
        p = counts / counts.sum()
        ppl = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
        return {"codes_used": int((counts > 0).sum()), "perplexity": round(ppl, 1)}

    res = {"codebook_size": codebook_size, **one(codes)}
    if codes.dim() == 3:
        res["per_branch"] = [one(codes[:, g]) for g in range(codes.shape[1])]
    return res


def real_features(inception: InceptionFeatures, source: str, n: int, size: int, cache_dir: str | Path,
                  classes: list[int] | None = None) -> tuple[ImageSet, torch.Tensor]:
    """The first ``n`` images of ``source`` (optionally of ``classes``) and their Inception features,
    cached on disk under a hash of the image pixels."""
    images = load_images(source, size, classes=classes, max_images=n)
    digest = hashlib.sha1(images.images.numpy().tobytes()).hexdigest()[:16]
    cache = Path(cache_dir) / f"inception_{len(images)}x{size}px_{digest}.pt"
    if cache.exists():
        note(f"Inception features of {len(images)} {source} images: reused from {cache}")
        return images, torch.load(cache, weights_only=True)
    feats = inception.features(images.images, desc=f"Inception features ({source}, cached after)").float()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, cache)
    return images, feats


def emit(result: dict, out: str | None) -> int:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- tokenizer


def eval_tokenizer(model: nn.Module, *, data: str = "tiny-val", n: int = 10000, batch_size: int = 50,
                   cache_dir: str | Path = "runs/cache", fid: bool = True, lpips_net: str | None = "vgg16") -> dict:
    """PSNR / SSIM of ``model``'s reconstructions of ``n`` images of ``data``, LPIPS (``lpips_net``; None skips
    it) and rFID against the same images (``fid``)."""
    t0 = time.time()
    size = image_size_of(model)
    inception = InceptionFeatures() if fid else None
    if inception is not None:
        real, real_f = real_features(inception, data, n, size, cache_dir)
    else:
        real, real_f = load_images(data, size, max_images=n), None
    codes: list[torch.Tensor] = []
    rec = reconstruct(model, real.images, batch_size, codes, desc="reconstructing")
    result: dict = {
        "n": len(real),
        "image_size": size,
        "psnr": float(psnr(real.images, rec).mean()),
        "psnr_pooled": float(10 * torch.log10(255.0**2 / (real.images.double() - rec.double()).pow(2).mean())),
        "ssim": float(ssim(real.images, rec).mean()),
    }
    if lpips_net:
        lp = LPIPS(lpips_net)
        lpips_parts = []
        with torch.no_grad(), progress(total=len(real), desc=f"LPIPS ({lpips_net})") as bar:
            for i in range(0, len(real), batch_size):
                lpips_parts.append(lp(to_float(real.images[i : i + batch_size]), to_float(rec[i : i + batch_size])))
                bar.update(len(lpips_parts[-1]))
        result[f"lpips_{lpips_net}"] = float(torch.cat(lpips_parts).mean())
    if codes and hasattr(model.config, "codebook_size"):
        result["codebook_usage"] = codebook_usage(torch.cat(codes), int(model.config.codebook_size))
    if inception is not None:
        rec_f = inception.features(rec, desc="Inception features (reconstructions)")
        result["rfid"] = frechet_distance(FeatureStats.of(rec_f), FeatureStats.of(real_f))
    result["seconds"] = round(time.time() - t0, 1)
    return result


# ---------------------------------------------------------------------------------------------- generator


def resolve_tokenizer_path(ref: str, generator_folder: str | Path) -> str:
    """The generator config's ``tokenizer`` field: a path as given, relative to the generator folder, a
    sibling folder of that name (``default-<name>`` refers to the sibling ``<name>``, as the server names the
    folders of ``weights/default``), or a sibling ``tokenizer`` folder."""
    parent = Path(generator_folder).parent
    sibling = ref.removeprefix("default-") if parent.name == "default" else ref
    for cand in (Path(ref), Path(generator_folder) / ref, parent / sibling, parent / "tokenizer"):
        if ref and cand.is_dir():
            return str(cand)
    raise FileNotFoundError(f"tokenizer {ref!r} of {generator_folder} not found; pass --tokenizer")


def sample_requests(config, labels: list[int], *, steps: int, cfg_scale: float, sampler_name: str, seed: int = 0):
    """One request per label (seeds ``seed + i``) of the generator family's request type: MAR rows take a
    :class:`models.sampling.mar.MARSampleRequest` (``steps`` = MAR iterations; cfg schedule, temperature and
    head steps from the model config), SiT / DiT rows a :class:`SampleRequest` (with the SiT path type). The
    guidance interval is the model config's."""
    from models.sampling import SampleRequest
    from models.sampling.mar import MARSampleRequest

    common = dict(steps=steps, cfg_scale=cfg_scale, sampler=sampler_name,
                  guidance_low=getattr(config, "guidance_low", 0.0), guidance_high=getattr(config, "guidance_high", 1.0))
    if getattr(config, "family", "") == "mar":
        return [MARSampleRequest(class_id=int(c), seed=seed + i, **common) for i, c in enumerate(labels)]
    return [SampleRequest(class_id=int(c), seed=seed + i, path_type=getattr(config, "path_type", "linear"), **common)
            for i, c in enumerate(labels)]


@torch.no_grad()
def generate(generator: nn.Module, tokenizer: nn.Module, classes: list[int], per_class: int, *, cfg_scale: float,
             steps: int, sampler_name: str, batch_size: int = 50, seed: int = 0,
             desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, H, W) and labels (N,), ``per_class`` per class, seeds ``seed + i``; the sampler is
    ``get_sampler(sampler_name, config)`` fed the module itself. SiT / DiT / MAR latents are denormalised and
    decoded; MaskGIT / VAR codes go to the tokenizer's ``decode`` as they are (VAR's sampler also takes the
    tokenizer, for its next-scale inputs). A progress bar named ``desc`` when given."""
    from models.sampling import get_sampler, run_to_completion, sampler_family

    g = generator.config
    needs_tokenizer = sampler_family(g.family).needs_tokenizer
    sampler = get_sampler(sampler_name, g, **({"tokenizer": tokenizer} if needs_tokenizer else {}))
    sample = g.sample_spec()
    shape = sample.shape
    labels = torch.tensor([c for c in classes for _ in range(per_class)])
    reqs = sample_requests(g, labels.tolist(), steps=steps, cfg_scale=cfg_scale, sampler_name=sampler_name,
                           seed=seed)
    out = []
    with progress(total=len(reqs), desc=desc) as bar:
        for i in range(0, len(reqs), batch_size):
            res = run_to_completion(sampler, generator, reqs[i : i + batch_size], shape)
            if sample.dtype == "int64":
                out.append(to_uint8(tokenizer.decode(res.long())))
            else:
                out.append(to_uint8(tokenizer.decode(tokenizer.denormalize_latents(res.float()))))
            bar.update(len(out[-1]))
    return torch.cat(out), labels


def classifier_accuracy(clf: EfficientNetLite0, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 50,
                        desc: str | None = None) -> float:
    logits = []
    with torch.no_grad(), progress(total=len(images), desc=desc) as bar:
        for i in range(0, len(images), batch_size):
            logits.append(clf.logits(to_float(images[i : i + batch_size])))
            bar.update(len(logits[-1]))
    return top1(torch.cat(logits), labels)


def eval_generator(folder: str, *, tokenizer: str | None = None, per_class: int = 50, cfg_scales=(1.0,),
                   steps: int | None = None, sampler: str | None = None, ref: str = "tiny-val", ref_n: int = 10000,
                   floor_n: int = 0, floor_source: str = "tiny-train", cache_dir: str | Path = "runs/cache",
                   grid: str | None = None, batch_size: int = 50, fid: bool = True) -> dict:
    """``fid=False`` skips Inception and gFID (the slow part on a CPU): classifier accuracy only."""
    t0 = time.time()
    gen = models.load_pretrained(folder).float()
    g = gen.config
    tok = models.load_pretrained(tokenizer or resolve_tokenizer_path(g.tokenizer, folder)).float()
    size = image_size_of(tok)
    classes = list(g.trained_classes) or list(range(g.num_classes))
    steps, sampler = steps or g.steps, sampler or g.sampler
    inception, clf = (InceptionFeatures() if fid else None), EfficientNetLite0()
    if inception is not None:
        real, real_f = real_features(inception, ref, ref_n, size, cache_dir, classes=classes)
        ref_stats = FeatureStats.of(real_f)
    else:
        real = load_images(ref, size, classes=classes, max_images=ref_n)
    result: dict = {"model": str(folder), "classes": len(classes), "per_class": per_class, "steps": steps,
                    "sampler": sampler, "reference": {"source": ref, "n": len(real)},
                    "classifier_top1_real": classifier_accuracy(clf, real.images, real.labels,
                                                                desc="classifying real images"), "runs": []}
    if floor_n and inception is not None:
        tr, tr_f = real_features(inception, floor_source, floor_n, size, cache_dir, classes=classes)
        result["fid_floor"] = {"source": floor_source, "n": len(tr), "fid": frechet_distance(FeatureStats.of(tr_f), ref_stats)}
    for s in cfg_scales:
        t1 = time.time()
        images, labels = generate(gen, tok, classes, per_class, cfg_scale=s, steps=steps, sampler_name=sampler,
                                  batch_size=batch_size, desc=f"sampling (cfg {s:g}, {steps} steps)")
        run = {"cfg_scale": s, "guidance_interval": [getattr(g, "guidance_low", 0.0), getattr(g, "guidance_high", 1.0)],
               "n": len(images)}
        if inception is not None:
            run["gfid"] = frechet_distance(FeatureStats.of(inception.features(images, desc="Inception features (samples)")),
                                           ref_stats)
        run["classifier_top1"] = classifier_accuracy(clf, images, labels, desc="classifying samples")
        run["seconds"] = round(time.time() - t1, 1)
        result["runs"].append(run)
        if grid:
            from training.plots import save_grid

            stem = Path(grid)
            stem = stem if stem.suffix else stem.with_suffix(".png")  # a bare stem gets PNG files
            save_grid(images[:: max(1, per_class)][:64], stem.with_name(f"{stem.stem}_cfg{s:g}{stem.suffix}"), nrow=8, scale=2)
    result["seconds"] = round(time.time() - t0, 1)
    return result


# ---------------------------------------------------------------------------------------------- latent stats


def compute_latent_stats(folder: str, *, data: str = "tiny-train", n: int = 10000, batch_size: int = 64,
                         num_classes: int | None = None, write: bool = True) -> dict:
    from training.latents import measure_latent_stats, write_latent_stats

    tok = models.load_pretrained(folder).float()
    classes = select_classes(data, num_classes=num_classes)
    images = load_images(data, image_size_of(tok), classes=classes, max_images=n)
    stats = measure_latent_stats(tok, images, batch_size)
    if write:
        write_latent_stats(folder, stats)
    return {"tokenizer": folder, "data": data, "n": stats.n, "vq_mean": stats.vq_mean, "vq_std": stats.vq_std,
            "written": write}


# ---------------------------------------------------------------------------------------------- CLI


def run_command(args: argparse.Namespace) -> int:
    """Run ``eval-tokenizer``, ``eval-generator`` or ``compute-latent-stats`` (arguments: training/__main__.py)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "eval-tokenizer":
        model = load_tokenizer(args.model, args.taef2_weights)
        res = eval_tokenizer(model, data=args.data, n=args.n, batch_size=args.batch_size, cache_dir=args.cache,
                             fid=not args.no_fid, lpips_net=None if args.no_lpips else "vgg16")
        return emit({"model": args.model, **res}, args.out)
    if args.command == "eval-generator":
        res = eval_generator(args.model, tokenizer=args.tokenizer, per_class=args.per_class,
                             cfg_scales=tuple(args.cfg or [1.0]), steps=args.steps, sampler=args.sampler,
                             ref=args.ref, ref_n=args.ref_n, floor_n=args.floor_n, cache_dir=args.cache,
                             grid=args.grid, batch_size=args.batch_size, fid=not args.no_fid)
        return emit(res, args.out)
    if args.command == "compute-latent-stats":
        return emit(compute_latent_stats(args.tokenizer, data=args.data, n=args.n, batch_size=args.batch_size,
                                         num_classes=args.num_classes, write=not args.dry_run), args.out)
    raise SystemExit(f"unknown command {args.command}")
