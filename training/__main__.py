"""Command line: ``python -m training <command> ...`` (see training/README.md).

Every command is one row of :data:`COMMANDS`: the training commands (:class:`TrainCommand`: ``tokenizer``,
``generator``, ``mar``, ``coda``, ``maskgit``, ``softvq-taef2``, ``var``) share their options and build their
config in one place (:func:`build_train_config`); the others (:class:`ToolCommand`: ``configs``,
``cache-features``, ``figures``, ``eval-tokenizer``, ``eval-generator``, ``compute-latent-stats``) declare
their own. The module that does the work is imported only when its command runs, so ``--help`` and
``configs`` answer without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training import config as C
from training import named


def _call(target: str, *args, **kwargs):
    """Import ``module:function`` and call it (the command's work, loaded only when it runs)."""
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainCommand:
    """A training command: ``--config`` (a named config of ``kind``, or a JSON / TOML file), the shortcuts,
    dotted overrides; ``train`` (``module:function``) gets the validated config and returns the export."""

    name: str
    kind: str  # the config kind the command trains (training.config.KINDS)
    default_config: str  # a name in training.named.NAMED
    train: str
    help: str
    what: str  # the first line printed: "python -m training <name>: <what>; starting ..."
    tokenizer_option: bool = False  # --tokenizer (shortcut for tokenizer=...)
    check: Callable[[C.TrainConfig], None] | None = None  # a command-specific check of the built config

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=self.default_config,
                       help="a named config (see `configs`) or a .json / .toml config file")
        p.add_argument("--data", help="training data (shortcut for data.train=...)")
        p.add_argument("--out", help="run folder (shortcut for run.out_dir=...)")
        p.add_argument("--steps", type=int, help="total steps (run.steps)")
        p.add_argument("--max-minutes", type=float, help="wall-clock budget (run.max_minutes)")
        if self.tokenizer_option:
            p.add_argument("--tokenizer", help="tokenizer serving folder (shortcut for tokenizer=...)")
        p.add_argument("--print-config", action="store_true",
                       help="print the validated config as JSON and exit (nothing is loaded or trained)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 run.batch_size=64")

    def run(self, args: argparse.Namespace) -> int:
        try:
            cfg = build_train_config(self, args)
        except C.ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        if args.print_config:
            print(json.dumps(C.to_dict(cfg), indent=2))
            return 0
        print(_call(self.train, cfg))
        return 0


def build_train_config(cmd: TrainCommand, args: argparse.Namespace) -> C.TrainConfig:
    """The config of a training command line: the named config or file, then the shortcuts, then the dotted
    overrides, validated as a whole (:class:`~training.config.ConfigError` names a bad field)."""
    if Path(args.config).suffix in (".json", ".toml"):
        cfg = C.load_file(args.config)
    else:
        cfg = named.get_named(args.config)
    if cfg.kind != cmd.kind:
        raise C.ConfigError(f"config {args.config!r} is a {cfg.kind} config; `{cmd.name}` trains {cmd.kind} configs")
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
    if cmd.check is not None:
        cmd.check(cfg)
    return cfg


def _trains_a_mar(cfg: C.TrainConfig) -> None:
    from models.registry import get_config

    if getattr(get_config(cfg.model), "family", "") != "mar":
        raise C.ConfigError(f"model = {cfg.model!r} is not a MAR; use the `generator` command")


# ---------------------------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class ToolCommand:
    """Any other command: its own arguments, and ``run(args) -> exit status``."""

    name: str
    help: str
    what: str | None  # the first line printed (None: print nothing, the command answers at once)
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _list_configs(args: argparse.Namespace) -> int:
    for name in sorted(named.NAMED):
        print(f"{name:22s} {named.summary(name)}")
    return 0


def _cache_features_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="tiny-train", help="image source (tiny-train, tiny-val, parquet, folder)")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--lite-resolution", type=int, default=128)
    p.add_argument("--lite-grid", type=int, default=2)
    p.add_argument("--max-images", type=int, help="only the first N images of the source")
    p.add_argument("--runtime", default="auto", choices=("auto", "onnx", "torch"))
    p.add_argument("--threads", type=int, default=0)


def _cache_features(args: argparse.Namespace) -> int:
    from training.feature_cache import FeatureCacheConfig, build_feature_cache

    print(build_feature_cache(FeatureCacheConfig(
        source=args.data, out=args.out, lite_resolution=args.lite_resolution, lite_grid=args.lite_grid,
        runtime=args.runtime, threads=args.threads, max_images=args.max_images)))
    return 0


def _figures_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default="weights/default/tokenizer")
    p.add_argument("--generator", default="weights/default/generator", help="'' to skip the sample grid")
    p.add_argument("--out", default="docs")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--steps", type=int, help="sampler steps (default: the generator config's)")
    p.add_argument("--sampler", help="sampler name (default: the generator config's)")
    p.add_argument("--threads", type=int, default=0)


def _figures(args: argparse.Namespace) -> int:
    import torch

    from training.figures import write_figures

    if args.threads:
        torch.set_num_threads(args.threads)
    for path in write_figures(args.tokenizer, args.generator or None, args.out, cfg_scale=args.cfg,
                              steps=args.steps, sampler=args.sampler):
        print(path)
    return 0


def _eval_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--cache", default="runs/cache", help="folder for cached real-image Inception features")
    p.add_argument("--out", help="also write the JSON result here")


def _eval_tokenizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="serving folder, registered name, or 'taef2'")
    p.add_argument("--taef2-weights", help="folder of taef2_{encoder,decoder}.pth (default ../shared/weights/taef2)")
    p.add_argument("--data", default="tiny-val")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--no-fid", action="store_true", help="skip rFID (Inception is the slow part on a CPU)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS (e.g. rFID alone after a --no-fid run)")
    _eval_common_args(p)


def _eval_generator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="generator serving folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the generator config's `tokenizer`)")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--cfg", type=float, action="append", help="guidance scale; repeat for several (default 1.0)")
    p.add_argument("--steps", type=int, help="sampler steps, MAR iterations for MAR (default: the model config's)")
    p.add_argument("--sampler", help="sampler name (default: the model config's)")
    p.add_argument("--ref", default="tiny-val", help="reference images for FID and real-image accuracy")
    p.add_argument("--ref-n", type=int, default=10000)
    p.add_argument("--floor-n", type=int, default=0, help="also the real-vs-real FID of N train images")
    p.add_argument("--grid", help="PNG path stem for one sample per class (per cfg scale)")
    p.add_argument("--no-fid", action="store_true", help="skip gFID (Inception): classifier accuracy only")
    _eval_common_args(p)


def _latent_stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="tokenizer serving folder")
    p.add_argument("--data", default="tiny-train")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--dry-run", action="store_true", help="print, do not write")
    _eval_common_args(p)


def _evaluate(args: argparse.Namespace) -> int:
    return _call("training.evaluate:run_command", args)


# ---------------------------------------------------------------------------------------------- the table

COMMANDS: dict[str, TrainCommand | ToolCommand] = {c.name: c for c in (
    TrainCommand("tokenizer", "tokenizer", "tokenizer-default", "training.tokenizer:train_tokenizer",
                 "train a tokenizer", "training a tokenizer"),
    TrainCommand("generator", "generator", "generator-default", "training.generator:train_generator",
                 "train a generator on a tokenizer's latents", "training a generator on a tokenizer's latents",
                 tokenizer_option=True),
    TrainCommand("mar", "generator", "mar-default", "training.generator:train_generator",
                 "train a MAR generator (the generator command, default config mar-default)",
                 "training a MAR generator on a tokenizer's latents", tokenizer_option=True, check=_trains_a_mar),
    TrainCommand("coda", "coda", "coda-taef2", "training.coda:train_coda",
                 "train a CODA discrete tokenizer on the frozen TAEF2 (training/coda.py)",
                 "training a CODA tokenizer on the frozen TAEF2"),
    TrainCommand("maskgit", "maskgit", "maskgit-taef2", "training.maskgit:train_maskgit",
                 "train MaskGIT on the codes of a CODA tokenizer folder (training/maskgit.py)",
                 "training MaskGIT on a CODA tokenizer's codes", tokenizer_option=True),
    TrainCommand("softvq-taef2", "softvq-taef2", "softvq-taef2-32x64", "training.softvq_taef2:train_softvq_taef2",
                 "train a SoftVQ tokenizer on the frozen TAEF2 from a feature cache (training/softvq_taef2.py)",
                 "training a SoftVQ tokenizer on the frozen TAEF2 from a feature cache"),
    TrainCommand("var", "var", "var-imagefolder", "training.var:train_var",
                 "train VAR on the codes of a multi-scale ImageFolder tokenizer folder (training/var.py)",
                 "training VAR on a multi-scale tokenizer's codes", tokenizer_option=True),
    ToolCommand("configs", "list the named training configurations", None, lambda p: None, _list_configs),
    ToolCommand("cache-features", "cache TAEF2 latents and EfficientNet-Lite0 features of a split "
                "(training/feature_cache.py; resumable)", "caching TAEF2 latents and Lite0 features",
                _cache_features_args, _cache_features),
    ToolCommand("figures", "write reconstructions.png and samples.png (the README figures)",
                "writing the reconstruction and sample grids", _figures_args, _figures),
    ToolCommand("eval-tokenizer", "rFID, PSNR, SSIM, LPIPS of a tokenizer on validation images",
                "evaluating a tokenizer (reconstructions, PSNR / SSIM / LPIPS, rFID)", _eval_tokenizer_args,
                _evaluate),
    ToolCommand("eval-generator", "gFID and classifier accuracy of a generator",
                "evaluating a generator (sampling, classifier accuracy, gFID)", _eval_generator_args, _evaluate),
    ToolCommand("compute-latent-stats", "measure vq_mean / vq_std and write them into config.json",
                "measuring a tokenizer's latent statistics", _latent_stats_args, _evaluate),
)}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m training`` parser: one sub-command per row of :data:`COMMANDS`."""
    ap = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS.values():
        cmd.add_arguments(sub.add_parser(cmd.name, help=cmd.help))
    return ap


def _announce(argv: list[str]) -> None:
    """One line at once (before torch and the data load) saying what this command is about to do; progress
    bars (training/progress.py, ``TOKSERVE_PROGRESS``) follow on stderr."""
    words = [a for a in argv if not a.startswith("-")]
    if not words or any(a in ("-h", "--help", "--print-config") for a in argv):
        return
    cmd = COMMANDS.get(words[0])
    what = "running" if cmd is None else cmd.what
    if what is None:
        return
    print(f"python -m training {words[0]}: {what}; starting (loading torch, the models and the data; "
          "progress follows)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _announce(argv)
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
