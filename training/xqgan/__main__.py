"""``python -m training.xqgan CONFIG.toml [--check] [--steps N] [--out DIR] [section.key=value ...]``: train an
XQ-GAN tokenizer. ``--steps`` and ``--out`` are the shortcuts every training command takes (``run.steps``,
``run.out_dir``)."""

from __future__ import annotations

import argparse
import json
import sys

from training.config import apply_overrides
from training.xqgan.config import ConfigError, check_model, load_config, to_dict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.xqgan", description=__doc__)
    ap.add_argument("config", help="TOML file (see configs/xqgan/)")
    ap.add_argument("overrides", nargs="*", help="section.key=value (values parsed as JSON)")
    ap.add_argument("--check", action="store_true", help="validate the config against its model and exit")
    ap.add_argument("--steps", type=int, help="total steps (shortcut for run.steps=N)")
    ap.add_argument("--out", help="run folder (shortcut for run.out_dir=DIR)")
    args = ap.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.insert(0, f"run.steps={args.steps}")
    if args.out:
        overrides.insert(0, f"run.out_dir={args.out}")
    try:
        cfg = apply_overrides(load_config(args.config), overrides)
        mcfg = check_model(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.check:
        run = to_dict(cfg)["run"]
        print(f"ok: {type(mcfg).__name__} {json.dumps(to_dict(cfg)['model'])}; run.steps={run.get('steps')} "
              f"run.out_dir={run.get('out_dir')}")
        return 0
    from training.xqgan.train import train_xqgan

    print(train_xqgan(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
