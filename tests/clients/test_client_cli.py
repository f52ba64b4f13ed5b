"""The ``tokserve`` command line against a scripted server (folders, naming, errors) and ``serve``'s exec."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from client_testkit import FAKE_D, FAKE_L, ScriptedServer, png_bytes
from PIL import Image
from tokserve import cli


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tokserve.cli", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, cwd=cwd
    )


def _image_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(png_bytes())
    (root / "sub" / "b.png").write_bytes(png_bytes())
    Image.new("RGB", (8, 8)).save(root / "sub" / "c.jpg")
    (root / "notes.txt").write_text("not an image")


def test_encode_decode_folders(fake_tokserve: ScriptedServer, tmp_path: Path) -> None:
    _image_tree(tmp_path / "imgs")
    env = {"TOKSERVE_URL": fake_tokserve.url}
    out = run_cli("encode", str(tmp_path / "imgs"), "-o", str(tmp_path / "lat"), "--batch-size", "2", env=env)
    assert out.returncode == 0, out.stderr
    files = sorted(p.relative_to(tmp_path / "lat").as_posix() for p in (tmp_path / "lat").rglob("*.npy"))
    assert files == ["a.npy", "sub/b.npy", "sub/c.npy"]
    assert np.load(tmp_path / "lat" / "sub" / "b.npy").shape == (FAKE_L, FAKE_D)
    encodes = fake_tokserve.calls("/v1/encode")
    assert len(encodes) == 2  # 3 images in batches of 2
    assert "multipart/form-data" in encodes[0].headers["content-type"]

    np.save(tmp_path / "lat" / "pair.npy", np.zeros((2, FAKE_L, FAKE_D), np.float32))
    out = run_cli("decode", str(tmp_path / "lat"), "-o", str(tmp_path / "dec"), env=env)
    assert out.returncode == 0, out.stderr
    pngs = sorted(p.relative_to(tmp_path / "dec").as_posix() for p in (tmp_path / "dec").rglob("*.png"))
    assert pngs == ["a.png", "pair_0.png", "pair_1.png", "sub/b.png", "sub/c.png"]


def test_single_files_and_generate(fake_tokserve: ScriptedServer, tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(png_bytes())
    url = ["--url", fake_tokserve.url]
    out = run_cli(
        "encode",
        str(tmp_path / "x.png"),
        "-o",
        str(tmp_path / "x.safetensors"),
        "--format",
        "safetensors",
        *url,
    )
    assert out.returncode == 0, out.stderr
    assert f"shape ({FAKE_L}, {FAKE_D})" in out.stdout
    assert cli.read_tokens(tmp_path / "x.safetensors").shape == (FAKE_L, FAKE_D)
    out = run_cli(
        "decode", str(tmp_path / "x.safetensors"), "-o", str(tmp_path / "x.webp"), "--format", "webp", *url
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "x.webp").exists() and out.stdout.strip() == str(tmp_path / "x.webp")
    out = run_cli(
        "generate",
        "--class",
        "1",
        "207",
        "-n",
        "2",
        "--seed",
        "9",
        "--steps",
        "3",
        "-o",
        str(tmp_path / "g"),
        *url,
    )
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert names == ["class1_seed10.png", "class1_seed9.png", "class207_seed10.png", "class207_seed9.png"]
    # the classes of one call are sent concurrently: one request each, in any order
    bodies = sorted((r.json() for r in fake_tokserve.calls("/v1/generate")), key=lambda b: b["class"])
    assert bodies == [{"class": c, "num_images": 2, "steps": 3, "seed": 9, "format": "png"} for c in (1, 207)]


def test_models_health_and_errors(
    fake_tokserve: ScriptedServer, scripted: ScriptedServer, tmp_path: Path
) -> None:
    out = run_cli("models", "--url", fake_tokserve.url)
    assert out.returncode == 0 and "fake-tok" in out.stdout and "4x8" in out.stdout
    assert run_cli("health", "--url", fake_tokserve.url).returncode == 0
    assert run_cli("health", "--url", scripted.url).returncode == 1  # no /readyz there: not ready
    out = run_cli("models", "--url", scripted.url, "--retries", "0")
    assert out.returncode == 1 and "NotFoundError" in out.stderr
    out = run_cli("encode", str(tmp_path / "missing.png"), "--url", fake_tokserve.url)
    assert out.returncode == 1 and "no such file" in out.stderr
    assert run_cli().returncode == 2  # no command: help


def test_serve_execs_python_m_server_without_importing_it(tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "server"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text("import sys, os\nprint('FAKE SERVER', sys.argv[1:], os.getpid())\n")
    env = {"PYTHONPATH": str(tmp_path / "fake")}
    code = "import os, sys; from tokserve.cli import main; print('PID', os.getpid(), flush=True); sys.exit(main())"
    out = subprocess.run(
        [sys.executable, "-c", code, "serve", "--host", "127.0.0.1", "--port", "9"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env}, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    pid = lines[0].split()[1]
    assert lines[1].startswith("FAKE SERVER ['--host', '127.0.0.1', '--port', '9']")
    assert lines[1].split()[-1] == pid  # exec: the same process became the server


def test_serve_without_server_installed_says_so(tmp_path: Path) -> None:
    # -I isolates from PYTHONPATH and the working directory; only the client package is put on the path.
    client_root = Path(cli.__file__).resolve().parents[1]
    code = f"import sys; sys.path.insert(0, {str(client_root)!r}); " + (
        "import importlib.util as u; real = u.find_spec; "
        "u.find_spec = lambda n, *a: None if n == 'server' else real(n, *a); "
        "from tokserve.cli import main; sys.exit(main(['serve']))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 2
    assert "not installed" in out.stderr and "pip install -e ." in out.stderr


def test_retry_defaults_per_command() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["bench"]).retries == 0  # a load test counts 429s instead of retrying them
    for command in (["models"], ["health"], ["generate", "--class", "1"], ["encode", "x.png"]):
        assert parser.parse_args(command).retries == 3, command
    assert parser.parse_args(["models", "--url", "http://h:1"]).url == "http://h:1"
