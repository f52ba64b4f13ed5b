"""Command line: ``python -m training <command> ...`` (see training/README.md).

Commands: ``tokenizer``, ``generator``, ``mar``, ``coda``, ``maskgit``, ``var`` (train), ``eval-tokenizer``, ``eval-generator``, ``compute-latent-stats``,
``figures`` (the README's reconstruction and sample grids), ``configs`` (list the named training configurations).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training import config as C


def _train_config(args: argparse.Namespace, kind: str) -> C.TrainConfig:
    if args.config.endswith(".json"):
        cfg = C.from_dict(json.loads(Path(args.config).read_text()))
    else:
        cfg = C.get_named(args.config)
    if cfg.kind != kind:
        raise SystemExit(f"config {args.config!r} is a {cfg.kind} config, not a {kind} config")
    shortcuts = []
    if args.data:
        shortcuts.append(f"data.train={args.data}")
    if args.out:
        shortcuts.append(f"run.out_dir={args.out}")
    if args.steps is not None:
        shortcuts.append(f"run.steps={args.steps}")
    if args.max_minutes is not None:
        shortcuts.append(f"run.max_minutes={args.max_minutes}")
    if getattr(args, "tokenizer", None):
        shortcuts.append(f"tokenizer={args.tokenizer}")
    overrides = shortcuts + list(args.overrides)
    cfg = C.apply_overrides(cfg, overrides)
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    if "tokenizer" in keys and "tokenizer_ref" not in keys and hasattr(cfg, "tokenizer_ref"):
        # another tokenizer than the named config's: its export must name that one, not the config's default
        cfg.tokenizer_ref = C.served_tokenizer_name(cfg.tokenizer)
    return cfg


def _add_train(sub, name: str, default: str, help: str) -> None:
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", default=default, help="a named config (see `configs`) or a config.json path")
    p.add_argument("--data", help="training data (shortcut for data.train=...)")
    p.add_argument("--out", help="run folder (shortcut for run.out_dir=...)")
    p.add_argument("--steps", type=int, help="total steps (run.steps)")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget (run.max_minutes)")
    if name in ("generator", "mar", "maskgit", "var"):
        p.add_argument("--tokenizer", help="tokenizer serving folder (shortcut for tokenizer=...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 run.batch_size=64")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m training`` parser (imports the modules that register configs and evaluation commands)."""
    ap = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    _add_train(sub, "tokenizer", "tokenizer-default", "train a tokenizer")
    _add_train(sub, "generator", "generator-default", "train a generator on a tokenizer's latents")
    _add_train(sub, "mar", "mar-default", "train a MAR generator (the generator command, default config mar-default)")
    _add_train(sub, "coda", "coda-taef2", "train a CODA discrete tokenizer on the frozen TAEF2 (training/discrete.py)")
    _add_train(sub, "maskgit", "maskgit-taef2", "train MaskGIT on the codes of a CODA tokenizer folder")
    _add_train(sub, "softvq-taef2", "softvq-taef2-32x64",
               "train a SoftVQ tokenizer on the frozen TAEF2 from a feature cache (training/softvq_taef2.py)")
    _add_train(sub, "var", "var-imagefolder", "train VAR on the codes of a multi-scale ImageFolder tokenizer folder")
    sub.add_parser("configs", help="list the named training configurations")
    p = sub.add_parser("cache-features", help="cache TAEF2 latents and EfficientNet-Lite0 features of a split "
                       "(training/feature_cache.py; resumable)")
    p.add_argument("--data", default="tiny-train", help="image source (tiny-train, tiny-val, parquet, folder)")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--lite-resolution", type=int, default=128)
    p.add_argument("--lite-grid", type=int, default=2)
    p.add_argument("--max-images", type=int, help="only the first N images of the source")
    p.add_argument("--runtime", default="auto", choices=("auto", "onnx", "torch"))
    p.add_argument("--threads", type=int, default=0)
    p = sub.add_parser("figures", help="write reconstructions.png and samples.png (the README figures)")
    p.add_argument("--tokenizer", default="weights/default/tokenizer")
    p.add_argument("--generator", default="weights/default/generator", help="'' to skip the sample grid")
    p.add_argument("--out", default="docs")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--steps", type=int, help="sampler steps (default: the generator config's)")
    p.add_argument("--sampler", help="sampler name (default: the generator config's)")
    p.add_argument("--threads", type=int, default=0)

    from training import (
        discrete,  # noqa: F401  (registers the coda / maskgit configs)
        evaluate,
        softvq_taef2,  # noqa: F401  (registers the softvq-taef2 configs)
        var,  # noqa: F401  (registers the var configs)
    )

    evaluate.add_commands(sub)
    return ap


WHAT = {
    "tokenizer": "training a tokenizer",
    "generator": "training a generator on a tokenizer's latents",
    "mar": "training a MAR generator on a tokenizer's latents",
    "coda": "training a CODA tokenizer on the frozen TAEF2",
    "maskgit": "training MaskGIT on a CODA tokenizer's codes",
    "softvq-taef2": "training a SoftVQ tokenizer on the frozen TAEF2 from a feature cache",
    "var": "training VAR on a multi-scale tokenizer's codes",
    "cache-features": "caching TAEF2 latents and Lite0 features",
    "figures": "writing the reconstruction and sample grids",
    "eval-tokenizer": "evaluating a tokenizer (reconstructions, PSNR / SSIM / LPIPS, rFID)",
    "eval-generator": "evaluating a generator (sampling, classifier accuracy, gFID)",
    "compute-latent-stats": "measuring a tokenizer's latent statistics",
}


def _announce(argv: list[str]) -> None:
    """One line at once (before torch and the data load) saying what this command is about to do; progress
    bars (training/progress.py, ``TOKSERVE_PROGRESS``) follow on stderr."""
    words = [a for a in argv if not a.startswith("-")]
    if not words or any(a in ("-h", "--help") for a in argv) or words[0] == "configs":
        return
    what = WHAT.get(words[0], "running")
    print(f"python -m training {words[0]}: {what}; starting (loading torch, the models and the data; "
          "progress follows)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _announce(argv)
    args = build_parser().parse_args(argv)

    if args.command == "configs":
        for name, fn in sorted(C.NAMED.items()):
            print(f"{name:22s} {(fn.__doc__ or '').strip()}")
        return 0
    if args.command == "cache-features":
        from training.feature_cache import FeatureCacheConfig, build_feature_cache

        print(build_feature_cache(FeatureCacheConfig(
            source=args.data, out=args.out, lite_resolution=args.lite_resolution, lite_grid=args.lite_grid,
            runtime=args.runtime, threads=args.threads, max_images=args.max_images)))
        return 0
    if args.command == "figures":
        import torch

        from training.figures import write_figures

        if args.threads:
            torch.set_num_threads(args.threads)
        for path in write_figures(args.tokenizer, args.generator or None, args.out, cfg_scale=args.cfg,
                                  steps=args.steps, sampler=args.sampler):
            print(path)
        return 0
    if args.command == "tokenizer":
        from training.tokenizer import train_tokenizer

        print(train_tokenizer(_train_config(args, "tokenizer")))
        return 0
    if args.command == "generator":
        from training.generator import train_generator

        print(train_generator(_train_config(args, "generator")))
        return 0
    if args.command == "mar":
        from models.registry import get_config
        from training.generator import train_generator

        cfg = _train_config(args, "generator")
        if getattr(get_config(cfg.model), "family", "") != "mar":
            raise SystemExit(f"config {args.config!r} trains {cfg.model}, not a MAR; use `generator`")
        print(train_generator(cfg))
        return 0
    if args.command in ("coda", "maskgit"):
        from training.discrete import train_coda, train_maskgit

        train = train_coda if args.command == "coda" else train_maskgit
        print(train(_train_config(args, args.command)))
        return 0
    if args.command == "softvq-taef2":
        from training.softvq_taef2 import train_softvq_taef2

        print(train_softvq_taef2(_train_config(args, "softvq-taef2")))
        return 0
    if args.command == "var":
        from training.var import train_var

        print(train_var(_train_config(args, "var")))
        return 0
    from training import evaluate

    return evaluate.run_command(args)


if __name__ == "__main__":
    sys.exit(main())
