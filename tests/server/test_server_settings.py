"""Settings from the environment, model resolution (names, folders, pairing), the error table, the CLI."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from server import settings as settings_mod
from server.cli import build_parser, settings_from_args
from server.engine.specs import resolve_models
from server.errors import (
    HTTP_STATUS,
    BadRequest,
    DeadlineExceeded,
    InvalidValue,
    ModelFailed,
    NotFound,
    QueueFull,
    ShuttingDown,
    from_wire,
    status_of,
    to_wire,
)
from server.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_env_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKSERVE_MODELS", "softvq-tiny-64, sit-tiny-64x32")
    monkeypatch.setenv("TOKSERVE_API_KEYS", "key-one,key-two")
    monkeypatch.setenv("TOKSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("REDIS_URL", "redis://x:6379/0")
    s = Settings()
    assert s.models == ["softvq-tiny-64", "sit-tiny-64x32"] and s.max_batch_size == 7
    assert s.api_key_values() == [b"key-one", b"key-two"] and "key-one" not in repr(s)  # secret in logs
    assert s.redis_url == "redis://x:6379/0"
    monkeypatch.setenv("TOKSERVE_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError):
        Settings()


def test_default_models_fall_back_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("TOKSERVE_MODELS", raising=False)
    monkeypatch.setattr(settings_mod, "DEFAULT_WEIGHTS", tmp_path / "none")
    with caplog.at_level(logging.WARNING, "tokserve.settings"):
        assert Settings().models == ["softvq-tiny-64", "sit-tiny-64x32"]
    assert "RANDOM WEIGHTS" in caplog.text
    for part in ("tokenizer", "generator"):
        (tmp_path / "default" / part).mkdir(parents=True)
        (tmp_path / "default" / part / "config.json").write_text("{}")
    monkeypatch.setattr(settings_mod, "DEFAULT_WEIGHTS", tmp_path / "default")
    assert Settings().models == [str(tmp_path / "default" / "tokenizer"), str(tmp_path / "default" / "generator")]
    for extra in ("mar", "coda", "notes"):  # other shipped folders follow, sorted; one without config is skipped
        (tmp_path / "default" / extra).mkdir()
        if extra != "notes":
            (tmp_path / "default" / extra / "config.json").write_text("{}")
    assert Settings().models == [str(tmp_path / "default" / p) for p in ("tokenizer", "generator", "coda", "mar")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("weights") / "default"
    torch.manual_seed(0)
    models.save_pretrained(models.create_model("softvq-tiny-64"), root / "tokenizer")
    models.save_pretrained(models.create_model("sit-tiny-64x32", tokenizer="softvq-s-64",
                                               trained_classes=(1, 5, 207)), root / "generator")
    return root


def test_folders_names_and_pairing(folders: Path) -> None:
    ms = resolve_models([str(folders / "tokenizer"), str(folders / "generator")])
    assert set(ms.specs) == {"default-tokenizer", "default-generator"}
    from server.engine.specs import _folder_name

    assert _folder_name(folders / "mar") == "default-mar" and _folder_name(folders.parent / "x" / "mar") == "mar"
    gen = ms.generator(None)
    assert gen.tokenizer == "default-tokenizer" and gen.image_size == 64  # paired by token shape
    assert gen.classes == (1, 5, 207) and not gen.random_weights and gen.source.endswith("generator")
    ms2 = resolve_models([f"mytok={folders / 'tokenizer'}", "sit-tiny-64x32"], default_generator="sit-tiny-64x32")
    assert ms2.tokenizer(None).name == "mytok" and ms2.generator(None).tokenizer == "mytok"
    assert ms2.generator(None).random_weights


def test_model_errors(folders: Path) -> None:
    with pytest.raises(ValueError, match="neither a folder"):
        resolve_models(["softvq-nope"])
    with pytest.raises(ValueError, match="no tokenizer"):
        resolve_models(["sit-tiny-64x32"])
    with pytest.raises(ValueError, match="token shape"):
        resolve_models(["softvq-tiny-64", "sit-tiny-32x64"])
    with pytest.raises(ValueError, match="twice|two models"):
        resolve_models(["softvq-tiny-64", "softvq-tiny-64"])
    ms = resolve_models(["softvq-tiny-64"])
    assert ms.default_generator is None
    with pytest.raises(NotFound, match="no generator"):
        ms.generator(None)
    with pytest.raises(NotFound, match="unknown tokenizer"):
        ms.tokenizer("sit")


def test_error_table_and_wire() -> None:
    expected = {BadRequest: 400, NotFound: 404, InvalidValue: 422, QueueFull: 429, ModelFailed: 500,
                ShuttingDown: 503, DeadlineExceeded: 504}
    for cls, status in expected.items():
        assert status_of(cls("x")) == status == HTTP_STATUS[cls]
    assert sorted(set(HTTP_STATUS.values())) == [400, 401, 404, 413, 415, 422, 429, 500, 503, 504]
    back = from_wire(to_wire(InvalidValue("bad shape")))
    assert isinstance(back, InvalidValue) and back.message == "bad shape"
    assert isinstance(from_wire(to_wire(ZeroDivisionError("x"))), ModelFailed)


def test_cli_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKSERVE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("TOKSERVE_MODELS", "softvq-tiny-64")
    args = build_parser().parse_args(["serve", "--port", "9001", "--max-batch-size", "1", "--models",
                                      "softvq-tiny-64,sit-tiny-64x32"])
    s = settings_from_args(args)
    assert args.port == 9001 and s.max_batch_size == 1 and s.models == ["softvq-tiny-64", "sit-tiny-64x32"]
    assert settings_from_args(build_parser().parse_args(["serve"])).max_batch_size == 4


def test_worker_without_redis_explains_and_exits_2() -> None:
    env = {"PATH": "/usr/bin:/bin", "TOKSERVE_MODELS": "softvq-tiny-64", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "server.worker"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "REDIS_URL" in r.stderr and "python -m server" in r.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two trained-tokenizer exports of the same shape (``runs/a/export``, ``runs/b/export``) and a generator
    trained on b's that (as ``python -m training generator --tokenizer runs/b/export`` with the default
    config's ref once did) calls its tokenizer ``default-tokenizer``."""
    from models.hub import weights_sha256

    root = tmp_path_factory.mktemp("pairing") / "runs"
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        models.save_pretrained(models.create_model("softvq-tiny-64"), root / name / "export")
    models.save_pretrained(models.create_model("sit-tiny-64x32", tokenizer="default-tokenizer",
                                               tokenizer_sha256=weights_sha256(root / "b" / "export")),
                           root / "gen" / "export")
    return root


def test_generator_pairs_with_the_tokenizer_whose_weights_it_was_trained_on(runs: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    a, b, gen = (str(runs / n / "export") for n in ("a", "b", "gen"))
    ms = resolve_models([a, b, gen])  # two folders called `export`: unique names from their parents
    assert set(ms.specs) == {"a-export", "b-export", "gen-export"}
    assert ms.generator(None).tokenizer == "b-export"  # by the weights' sha256, not by shape (both fit)
    ms = resolve_models([f"other={a}", f"mine={b}", gen])
    assert ms.generator(None).tokenizer == "mine"  # whatever the operator calls it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokserve.models"):
        ms = resolve_models([a, gen])  # its tokenizer is not loaded: by shape, and said loudly
    assert ms.generator(None).tokenizer == "a-export"
    assert any("by token shape" in r.getMessage() and "gen-export" in r.getMessage() for r in caplog.records)


def test_two_models_of_one_name_get_one_clear_line(runs: Path, tmp_path: Path) -> None:
    for n in ("x", "y"):
        models.save_pretrained(models.load_pretrained(runs / "a" / "export"), tmp_path / n / "tok")
    entries = f"{tmp_path / 'x' / 'tok'},{tmp_path / 'y' / 'tok'}"
    with pytest.raises(ValueError, match="name=path"):
        resolve_models(entries.split(","))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "TOKSERVE_MODELS": entries,
           "REDIS_URL": "redis://127.0.0.1:1/0"}
    for cmd in (["-m", "server", "--port", "0"], ["-m", "server.worker"]):
        r = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=120)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        print(f"\n{' '.join(cmd)} -> {r.returncode}: {lines}")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(lines) == 1 and "two models are named 'tok'" in lines[0] and "name=path" in lines[0]


def test_exports_are_cached_by_default_and_an_empty_value_turns_the_cache_off(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("TOKSERVE_EXPORT_DIR", raising=False)
    assert Settings().export_dir == str(tmp_path / "tokserve" / "exports")
    monkeypatch.setenv("TOKSERVE_EXPORT_DIR", "")
    assert Settings().export_dir is None
    monkeypatch.setenv("TOKSERVE_EXPORT_DIR", str(tmp_path / "mine"))
    assert Settings().export_dir == str(tmp_path / "mine")
