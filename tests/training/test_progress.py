"""Early output and progress of the long training commands, and the latent cache reused across runs.

A real ``python -m training generator`` run (tiny scale, a subprocess with a pipe for stdout / stderr, as under
nohup or CI) must say what it does at once and show plain progress lines for loading and encoding; the latent
cache it writes is read back by the next run with the same settings (no image loaded, nothing encoded) and
rebuilt when a setting it depends on changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import models
from training import config as C
from training import data as D
from training.data import ImageSet, tiny_imagenet_validation
from training.generator import prepare_latents
from training.latents import encode_cached
from training.named import get_named
from training.progress import LineBar, progress

pytestmark = pytest.mark.skipif(not tiny_imagenet_validation()[0].exists(), reason="shared data not present")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """An (untrained) tiny tokenizer serving folder: encoding needs weights, not good ones."""
    torch.manual_seed(0)
    return models.save_pretrained(models.create_model("softvq-tiny-64"), tmp_path_factory.mktemp("tok") / "tok")


def _run_command(args: list[str]) -> tuple[float, list[str], int]:
    """Run ``python -m training ARGS`` with stdout and stderr on one pipe: seconds to its first line, all lines,
    exit status."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKSERVE_PROGRESS": "auto", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "training", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first = proc.stdout.readline()
    t_first = time.monotonic() - t0
    rest = proc.stdout.read().splitlines()
    proc.wait(timeout=600)
    return t_first, [first.rstrip("\n"), *rest], proc.returncode


def test_generator_command_speaks_at_once_shows_progress_and_reuses_its_latents(tokenizer_dir: Path,
                                                                                tmp_path: Path) -> None:
    cache = tmp_path / "latents.pt"
    common = ["--config", "generator-tiny", "--tokenizer", str(tokenizer_dir), "--steps", "2", "data.max_images=48",
              "run.batch_size=16", "run.threads=1", "sample_steps=2", f"latent_cache={cache}"]
    t_first, lines, rc = _run_command(["generator", "--out", str(tmp_path / "a"), *common])
    text = "\n".join(lines)
    assert rc == 0, text
    # the first line, before torch is imported, says what the command does (bound generous: a loaded 2-core box)
    assert t_first < 10, (t_first, lines[0])
    assert lines[0].startswith("python -m training generator: training a generator"), lines[0]
    # progress as whole lines (a pipe is not a terminal: no carriage returns), start and end of each step
    assert "\r" not in text
    loading = [ln for ln in lines if ln.startswith("loading images (tiny-val, 64px):")]
    encoding = [ln for ln in lines if ln.startswith("encoding latents:")]
    assert loading and "48/48" in loading[-1], text
    assert encoding and "48/48" in encoding[-1], text
    assert f"latent cache {cache}: written (48 latents)" in text

    # a second run with the same tokenizer and data: the cache is read, no image loaded, nothing encoded
    _, lines, rc = _run_command(["generator", "--out", str(tmp_path / "b"), *common])
    text = "\n".join(lines)
    assert rc == 0, text
    assert any(ln.startswith(f"latent cache {cache}: reused (48 latents") for ln in lines), text
    assert not any(ln.startswith(("loading images", "encoding latents")) for ln in lines), text


def test_prepare_latents_reuses_the_cache_and_recomputes_when_a_setting_changes(tokenizer_dir: Path,
                                                                                tmp_path: Path, capsys) -> None:
    cache = tmp_path / "latents.pt"

    def cfg(*overrides: str) -> C.GeneratorTrainConfig:
        return C.apply_overrides(get_named("generator-tiny"), [
            f"tokenizer={tokenizer_dir}", f"run.out_dir={tmp_path / 'run'}", f"latent_cache={cache}",
            "data.max_images=24", *overrides])

    tok = models.load_pretrained(tokenizer_dir).float()
    first = prepare_latents(cfg(), tok, torch.device("cpu"))
    err = capsys.readouterr().err
    assert "none yet; encoding" in err and "loading images" in err and "encoding latents" in err
    assert first.images.shape[0] == 24 and first.images.dtype == torch.float16
    written = cache.stat().st_mtime_ns

    again = prepare_latents(cfg(), tok, torch.device("cpu"))
    err = capsys.readouterr().err
    assert "reused (24 latents" in err and "loading images" not in err and "encoding latents" not in err
    assert cache.stat().st_mtime_ns == written
    torch.testing.assert_close(again.images, first.images)
    assert torch.equal(again.labels, first.labels)

    # a data setting in the key (here the image count, then the flip) changes: encoded again
    fewer = prepare_latents(cfg("data.max_images=16"), tok, torch.device("cpu"))
    assert "encoding again" in capsys.readouterr().err and fewer.images.shape[0] == 16
    flipped = prepare_latents(cfg("data.max_images=16", "encode_flip=true"), tok, torch.device("cpu"))
    assert "encoding again" in capsys.readouterr().err and flipped.images.shape[0] == 32

    # new tokenizer weights (the fingerprint of its weight files): encoded again
    time.sleep(0.01)
    models.save_pretrained(tok, tokenizer_dir)
    prepare_latents(cfg("data.max_images=16", "encode_flip=true"), tok, torch.device("cpu"))
    assert "encoding again" in capsys.readouterr().err


def test_encode_cached_calls_encode_only_on_a_miss(tmp_path: Path, capsys) -> None:
    calls = []

    def encode(n: int):
        def run() -> ImageSet:
            calls.append(n)
            return ImageSet(torch.arange(n * 6, dtype=torch.float32).reshape(n, 3, 2), torch.arange(n))
        return run

    cache = tmp_path / "sub" / "latents.pt"
    a = encode_cached(cache, key="k1", encode=encode(4))
    b = encode_cached(cache, key="k1", encode=encode(4))
    assert calls == [4] and torch.equal(a.images, b.images) and b.images.dtype == torch.float16
    assert "reused (4 latents" in capsys.readouterr().err
    c = encode_cached(cache, key="k2", encode=encode(5))
    assert calls == [4, 5] and c.images.shape == (5, 3, 2)
    assert encode_cached(cache, key="k2", encode=encode(5)).images.shape == (5, 3, 2) and calls == [4, 5]


def test_skipped_records_are_not_decoded(monkeypatch) -> None:
    """A resumed reader (the feature cache's chunks) passes over the records it already has without decoding."""
    everything = [label for _, label in D.iter_records("tiny-val", max_images=1200)]
    decoded = []
    real_decode = D.decode_image
    monkeypatch.setattr(D, "decode_image", lambda b: decoded.append(1) or real_decode(b))
    rest = [label for _, label in D.iter_records("tiny-val", max_images=1200, skip=1150)]
    assert rest == everything[1150:] and len(decoded) == 50
    assert D.count_records("tiny-val", max_images=1200) == 1200
    classes = sorted(set(everything))[:3]
    picked = [label for _, label in D.iter_records("tiny-val", classes=classes, max_images=120)]
    decoded.clear()
    assert [label for _, label in D.iter_records("tiny-val", classes=classes, max_images=120, skip=100)] == picked[100:]
    assert len(decoded) == len(picked) - 100
    assert D.count_records("tiny-val", classes=classes, max_images=120) == len(picked)


def test_progress_lines_without_a_terminal(monkeypatch, capsys) -> None:
    monkeypatch.setenv("TOKSERVE_PROGRESS", "auto")
    monkeypatch.setenv("TOKSERVE_PROGRESS_INTERVAL", "3600")
    bar = progress(total=1000, desc="loading images")
    assert isinstance(bar, LineBar)  # stderr is captured here: not a terminal
    for _ in range(1000):
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 2, lines  # the start and the end, nothing in between
    assert "0/1000" in lines[0] and "1000/1000" in lines[1]
    monkeypatch.setenv("TOKSERVE_PROGRESS", "none")
    with progress(total=10, desc="quiet") as b:
        b.update(10)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("TOKSERVE_PROGRESS", "log")
    with progress(total=10, desc=None) as b:  # no name: no bar
        b.update(10)
    assert capsys.readouterr().err == ""
