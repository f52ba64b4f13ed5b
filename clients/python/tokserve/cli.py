"""The ``tokserve`` command line: ``encode | decode | generate | models | health | bench | serve``.

Built on the SDK (HTTP only). ``serve`` is the one exception that runs the server, and it does so without
importing it: it replaces this process with ``python -m server ARGS`` in the same interpreter.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import _tensors
from ._base import default_url
from ._images import IMAGE_SUFFIXES
from .bench_cli import add_bench_parser
from .client import Client
from .errors import TokserveError

TENSOR_SUFFIXES = (".npy", ".safetensors")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokserve`` console script; returns the exit status."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] == "serve":
        return serve(args_in[1:])
    parser = build_parser()
    args = parser.parse_args(args_in)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TokserveError as exc:
        print(f"tokserve: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"tokserve: error: {exc}", file=sys.stderr)
        return 1


def common_parser(retries: int = 3) -> argparse.ArgumentParser:
    """The connection options every command takes (a fresh parser each call: argparse shares actions)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection")
    g.add_argument("--url", default=default_url(), help="server URL (env TOKSERVE_URL; default %(default)s)")
    g.add_argument("--api-key", default=os.environ.get("TOKSERVE_API_KEY"), help="env TOKSERVE_API_KEY")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default %(default)s)")
    g.add_argument("--retries", type=int, default=retries, help="retries on connection errors, 429, 503")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = argparse.ArgumentParser(prog="tokserve", description="Client of a tokserve server.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("encode", parents=[common], help="images (files or folders) -> token files")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument(
        "-o", "--output", default=".", help="output folder, or a .npy/.safetensors file for one image"
    )
    p.add_argument("--model", help="tokenizer (default: the server's default)")
    p.add_argument("--preprocess", choices=["center-crop", "resize"])
    p.add_argument("--batch-size", type=int, default=8, help="images per request (default %(default)s)")
    p.add_argument("--format", choices=["npy", "safetensors"], default="npy", help="token file format")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", parents=[common], help="token files (.npy/.safetensors) -> images")
    p.add_argument("inputs", nargs="+", help="token files or folders; each holds (L, D) or (B, L, D)")
    p.add_argument("-o", "--output", default=".", help="output folder, or an image file for one input row")
    p.add_argument("--model", help="tokenizer (default: the server's default)")
    p.add_argument("--format", choices=["png", "jpeg", "webp"], default="png")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("generate", parents=[common], help="class ids -> generated images")
    p.add_argument("classes", type=int, nargs="*", metavar="CLASS", help="ImageNet-1k ids (or use --class)")
    p.add_argument("--class", dest="class_ids", type=int, nargs="+", default=[], help="ImageNet-1k ids")
    p.add_argument(
        "--concurrency", type=int, default=8, help="classes generated at once (default %(default)s)"
    )
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per class")
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"))
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler")
    p.add_argument("--seed", type=int, help="base seed (image i of a class uses seed + i)")
    p.add_argument("--model", help="generator (default: the server's default)")
    p.add_argument("--format", choices=["png", "jpeg", "webp"], default="png")
    p.add_argument("--save-latents", action="store_true", help="also write each image's latents as .npy")
    p.add_argument("-o", "--output", default=".", help="output folder (default: current)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("models", parents=[common], help="list the served models")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("health", parents=[common], help="liveness and readiness (exit 0 only if ready)")
    p.set_defaults(func=cmd_health)

    add_bench_parser(sub, common_parser(retries=0))  # a load test counts errors, it does not retry
    sub.add_parser(
        "serve", help="run the server: python -m server ARGS (needs the tokserve server installed)"
    )
    return parser


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, api_key=args.api_key, timeout=args.timeout, max_retries=args.retries)


def collect_files(inputs: Iterable[str], suffixes: tuple[str, ...]) -> list[tuple[Path, Path]]:
    """``(file, path relative to its input root)`` for every input file and every matching file in folders."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            found.extend((f, f.relative_to(path)) for f in files)
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    if not found:
        raise ValueError(f"no {'/'.join(suffixes)} files found in {list(inputs)}")
    return found


def _has_folder(inputs: Iterable[str]) -> bool:
    return any(Path(i).is_dir() for i in inputs)


def _out_path(output: str, rel: Path, suffix: str, single: bool) -> Path:
    out = Path(output)
    if single and out.suffix.lower() == suffix:
        target = out
    else:
        target = out / rel.with_suffix(suffix)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def cmd_encode(args: argparse.Namespace) -> int:
    files = collect_files(args.inputs, IMAGE_SUFFIXES)
    suffix = "." + args.format
    single = len(files) == 1
    with (
        _client(args) as client,
        tqdm(total=len(files), unit="img", disable=not _has_folder(args.inputs)) as bar,
    ):
        for i in range(0, len(files), max(1, args.batch_size)):
            chunk = files[i : i + args.batch_size]
            latents = client.encode([f for f, _ in chunk], model=args.model, preprocess=args.preprocess)
            for row, (_, rel) in enumerate(chunk):
                target = _out_path(args.output, rel, suffix, single)
                data = latents.array[row]
                raw = _tensors.to_npy(data) if args.format == "npy" else _tensors.to_safetensors(data)
                target.write_bytes(raw)
                if single:
                    print(f"{target}  shape {tuple(data.shape)} {data.dtype}  model {latents.model}")
            bar.update(len(chunk))
    if not single:
        print(f"encoded {len(files)} images into {args.output}")
    return 0


def read_tokens(path: Path) -> np.ndarray:
    """A token file: ``.npy`` or ``.safetensors`` (tensor ``tokens`` or the only one)."""
    data = path.read_bytes()
    return (
        _tensors.from_safetensors(data) if path.suffix.lower() == ".safetensors" else _tensors.from_npy(data)
    )


def cmd_decode(args: argparse.Namespace) -> int:
    files = collect_files(args.inputs, TENSOR_SUFFIXES)
    suffix = "." + ("jpg" if args.format == "jpeg" else args.format)
    written: list[Path] = []
    with _client(args) as client:
        for path, rel in tqdm(files, unit="file", disable=not _has_folder(args.inputs)):
            tokens = read_tokens(path)
            images = client.decode_result(tokens, model=args.model, format=args.format).images
            single = len(files) == 1 and len(images) == 1
            for i, img in enumerate(images):
                name = rel if len(images) == 1 else rel.with_name(f"{rel.stem}_{i}{rel.suffix}")
                target = _out_path(args.output, name, suffix, single)
                img.save(target)
                written.append(target)
    print(written[0] if len(written) == 1 else f"decoded {len(written)} images into {args.output}")
    return 0


def _served_classes(client: Client, model: str | None, class_ids: list[int]) -> None:
    """Refuse (ValueError, before any generation) classes the generator does not serve."""
    models = client.models()
    name = model or models.default_generator
    if name is None:
        raise ValueError("the server has no generator")
    try:
        info = models.get(name)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    served = set(info.classes) if info.classes is not None else None
    if served is None and info.num_classes is not None:
        served = set(range(info.num_classes))
    bad = [c for c in class_ids if served is not None and c not in served]
    if bad:
        shown = sorted(served) if served is not None and len(served) <= 20 else None
        what = f"it serves {shown}" if shown is not None else f"it serves {len(served or ())} classes"
        if served and shown is None:
            what += f" in {min(served)}..{max(served)}"
        raise ValueError(f"{name} does not serve class(es) {bad}: {what} (see `tokserve models --json`)")


def cmd_generate(args: argparse.Namespace) -> int:
    class_ids = list(args.classes) + list(args.class_ids)
    if not class_ids:
        raise ValueError("no class given: tokserve generate CLASS [CLASS ...] (or --class CLASS ...)")
    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    out = Path(args.output)
    suffix = "." + ("jpg" if args.format == "jpeg" else args.format)
    interval = tuple(args.guidance_interval) if args.guidance_interval else None
    with _client(args) as client:
        _served_classes(client, args.model, class_ids)
        out.mkdir(parents=True, exist_ok=True)

        def one(class_id: int) -> list[Path]:
            res = client.generate(
                class_id,
                args.num_images,
                cfg_scale=args.cfg_scale,
                guidance_interval=interval,  # type: ignore[arg-type]
                steps=args.steps,
                sampler=args.sampler,
                seed=args.seed,
                return_latents=args.save_latents,
                model=args.model,
                format=args.format,
            )
            seeds = res.seeds or [(res.seed or 0) + i for i in range(len(res.images))]
            written = []
            for i, (img, seed) in enumerate(zip(res.images, seeds, strict=False)):
                target = out / f"class{class_id}_seed{seed}{suffix}"
                img.save(target)
                if args.save_latents and res.latents is not None:
                    target.with_suffix(".npy").write_bytes(_tensors.to_npy(res.latents[i]))
                written.append(target)
            return written

        # the classes of one call run concurrently (the server batches their rows step by step)
        with ThreadPoolExecutor(min(args.concurrency, len(class_ids))) as pool, tqdm(
            total=len(class_ids), unit="class", disable=len(class_ids) == 1
        ) as bar:
            futures = [pool.submit(one, c) for c in class_ids]
            try:
                for future in as_completed(futures):
                    for target in future.result():
                        print(target)
                    bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.models()
    if args.json:
        print(
            json.dumps(
                {
                    "models": [m.raw for m in models.models],
                    "default_tokenizer": models.default_tokenizer,
                    "default_generator": models.default_generator,
                },
                indent=2,
            )
        )
        return 0
    print(f"{'name':<24}{'kind':<11}{'image':>6}  {'tokens':<12}{'runtime':<12}default")
    for m in models.models:
        is_default = m.name in (models.default_tokenizer, models.default_generator)
        shape = "x".join(str(s) for s in m.token_shape) if m.token_shape else "-"
        runtime = m.runtime if isinstance(m.runtime, str) else json.dumps(m.runtime) if m.runtime else "-"
        print(
            f"{m.name:<24}{m.kind:<11}{m.image_size or '-':>6}  {shape:<12}{runtime:<12}{'*' if is_default else ''}"
        )
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        live, ready = client.health(), client.ready()
    print(f"{args.url}: live={'yes' if live else 'no'} ready={'yes' if ready else 'no'}")
    return 0 if ready else 1


def serve(server_args: Sequence[str]) -> int:
    """Replace this process with ``python -m server SERVER_ARGS`` (same interpreter, server not imported)."""
    if importlib.util.find_spec("server") is None:
        print(
            "tokserve serve: the tokserve server is not installed in this Python "
            f"({sys.executable}).\nThe client package has only the SDK and command line; install the "
            "server from the project root (pip install -e .) or run `make serve` there.",
            file=sys.stderr,
        )
        return 2
    cmd = [sys.executable, "-m", "server", *server_args]
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "nt":  # no exec on Windows: run and relay the status
        import subprocess

        return subprocess.call(cmd)
    os.execv(sys.executable, cmd)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
