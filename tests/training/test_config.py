"""Typed training configs (pydantic): the named-config registry, JSON / TOML files, dotted overrides with type
checks and errors naming the field, stored run configs that must keep loading, the command table, LR schedule,
EMA."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from training import config as C
from training import named
from training.__main__ import COMMANDS, TrainCommand, build_parser, build_train_config, main
from training.trainer import EMA, lr_factor

ROOT = Path(__file__).resolve().parents[2]
WIP = ROOT / "weights" / "wip" / "softvq-taef2-32x64"
# the command line of the live softvq-taef2 run, which every later session resumes with exactly these words
LIVE_RESUME = ("softvq-taef2 --config softvq-taef2-32x64 run.resume_from=weights/wip/softvq-taef2-32x64 "
               "run.steps=20000 run.progress=log")


def _config_of(argv: str) -> C.TrainConfig:
    args = build_parser().parse_args(shlex.split(argv))
    return build_train_config(COMMANDS[args.command], args)


def test_named_configs_build_and_round_trip_as_json_and_toml(tmp_path: Path) -> None:
    assert {"tokenizer-default", "tokenizer-tiny", "generator-default", "generator-tiny", "dit-tiny", "coda-taef2",
            "maskgit-taef2", "var-imagefolder", "softvq-taef2-32x64", "sit-softvq-taef2"} <= set(named.NAMED)
    for name in named.NAMED:
        cfg = named.get_named(name)
        assert type(cfg) is C.KINDS[cfg.kind] and named.summary(name)
        back = C.from_dict(json.loads(json.dumps(C.to_dict(cfg))))
        assert back == cfg and type(back) is type(cfg)
        assert named.get_named(name) is not cfg  # a fresh copy each time: a caller's edits stay its own
    # TOML: the same document, sections as tables (None fields left out: TOML has no null)
    cfg = C.apply_overrides(named.get_named("generator-default"), ["data.classes=[1, 2, 3]"])
    doc = C.to_dict(cfg)
    lines = [f"{k} = {json.dumps(v)}" for k, v in doc.items() if v is not None and not isinstance(v, dict)]
    for section, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in table.items() if v is not None]
    (tmp_path / "gen.toml").write_text("\n".join(lines) + "\n")
    assert C.load_file(tmp_path / "gen.toml") == cfg
    with pytest.raises(C.ConfigError, match=r"unknown training config 'tokenizer-tiy' \(did you mean 'tokenizer-tiny'"):
        named.get_named("tokenizer-tiy")


def test_every_train_command_defaults_to_a_named_config_of_its_kind() -> None:
    train = [c for c in COMMANDS.values() if isinstance(c, TrainCommand)]
    assert {c.name for c in train} == {"tokenizer", "generator", "mar", "coda", "maskgit", "softvq-taef2", "var"}
    for cmd in train:
        assert named.get_named(cmd.default_config).kind == cmd.kind, cmd.name
        module, _, fn = cmd.train.partition(":")
        assert callable(getattr(__import__(module, fromlist=[fn]), fn)), cmd.train


def test_dotted_overrides_are_typed() -> None:
    cfg = C.apply_overrides(named.get_named("tokenizer-tiny"), [
        "optim.lr=3e-4", "run.steps=7", "data.crop_scale=[0.8, 1.0]", "data.num_classes=10", "loss.recon=l2",
        "run.max_minutes=null", "model_overrides.tau=0.1", "data.train=/some/folder", "run.bf16=false",
        "optim.warmup_steps=0", "run.out_dir=2024",
    ])
    assert cfg.optim.lr == 3e-4 and cfg.run.steps == 7 and cfg.data.crop_scale == (0.8, 1.0)
    assert cfg.data.num_classes == 10 and cfg.loss.recon == "l2" and cfg.run.max_minutes is None
    assert cfg.model_overrides["tau"] == 0.1 and cfg.data.train == "/some/folder" and cfg.run.bf16 is False
    assert cfg.run.out_dir == "2024"  # a string field keeps the words as written
    assert isinstance(C.apply_overrides(named.get_named("tokenizer-tiny"), ["optim.lr=1"]).optim.lr, float)
    assert named.get_named("tokenizer-tiny").optim.lr == 2e-3  # overrides return a copy


@pytest.mark.parametrize("override, message", [
    ("optim.wieght_decay=0", r"unknown field optim.wieght_decay \(did you mean 'weight_decay'\?\); known: \['lr'"),
    ("optimm.lr=1", r"unknown field optimm \(did you mean 'optim'\?\)"),
    ("run.steps=many", r"run.steps: Input should be a valid integer, got 'many'"),
    ("run.steps=1.5", r"run.steps: Input should be a valid integer, got 1.5"),
    ("run.bf16=1", r"run.bf16: Input should be a valid boolean, got 1"),
    ("optim.lr=true", r"optim.lr: Input should be a valid number, got True"),
    ("optim.betas=0.9", r"optim.betas: Input should be a valid array"),
    ("loss.recon=l3", r"loss.recon = 'l3' is not a known choice; choose from \['l1', 'l2', 'l1\+l2'\]"),
    ("run.progress=lg", r"run.progress = 'lg' is not a known choice.*did you mean 'log'"),
    ("optim.lr.max=1", r"optim.lr is a value, not a section"),
    ("run.steps", r"override 'run.steps' is not key=value"),
])
def test_bad_overrides_name_the_field(override: str, message: str) -> None:
    with pytest.raises(C.ConfigError, match=message):
        C.apply_overrides(named.get_named("tokenizer-tiny"), [override])


def test_assignment_is_checked_like_construction() -> None:
    cfg = named.get_named("generator-tiny")
    cfg.run.steps = 5
    with pytest.raises(ValueError, match="valid integer"):
        cfg.run.steps = "5"
    with pytest.raises(ValueError, match="budget_clock"):
        C.RunConfig(budget_clock="gpu")


def test_files_and_documents_fail_with_the_file_and_the_field(tmp_path: Path) -> None:
    doc = C.to_dict(named.get_named("coda-tiny"))
    doc["run"]["batch_size"] = "16"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(C.ConfigError, match=r"bad.json: run.batch_size: Input should be a valid integer, got '16'"):
        C.load_file(tmp_path / "bad.json")
    (tmp_path / "bad.toml").write_text('kind = "coda"\n[run]\nsteps = \n')
    with pytest.raises(C.ConfigError, match=r"bad.toml: not valid TOML"):
        C.load_file(tmp_path / "bad.toml")
    with pytest.raises(C.ConfigError, match=r"kind = 'xqgan' is not a training config kind"):
        C.from_dict({"kind": "xqgan"})
    (tmp_path / "cfg.yaml").write_text("{}")
    with pytest.raises(C.ConfigError, match=r"ends in .json or .toml"):
        C.load_file(tmp_path / "cfg.yaml")


def test_cli_refuses_a_bad_config_before_loading_anything(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["coda", "--config=coda-tiny", f"--out={out}", "space=pixels"]) == 2
    assert "config error: space = 'pixels' is not a known choice; choose from ['latent', 'image']" in (
        capsys.readouterr().err)
    assert main(["coda", "--config=maskgit-tiny"]) == 2
    assert "is a maskgit config; `coda` trains coda configs" in capsys.readouterr().err
    assert not out.exists()


def test_print_config_shows_the_validated_config(capsys) -> None:
    assert main(["maskgit", "--config=maskgit-tiny", "--steps=3", "--tokenizer=weights/default/coda",
                 "--print-config"]) == 0
    cfg = C.from_dict(json.loads(capsys.readouterr().out))
    assert cfg.run.steps == 3 and cfg.tokenizer == "weights/default/coda" and cfg.tokenizer_ref == "default-coda"


def test_the_committed_wip_run_config_loads_and_equals_the_live_resume_command() -> None:
    """The live softvq-taef2 run resumes with exactly LIVE_RESUME; its committed wip.json stores the config that
    command built when the run started. Both must keep loading, and stay the same config."""
    state = json.loads((WIP / "wip.json").read_text())
    stored = C.from_dict(state["run_config"])
    assert isinstance(stored, C.LatentTokenizerTrainConfig) and stored.run.resume_from == str(WIP.relative_to(ROOT))
    live = _config_of(LIVE_RESUME)
    assert live == stored
    assert C.to_dict(live) == state["run_config"]  # the same document, field for field (tuples as lists)


DOCS = [ROOT / "README.md", ROOT / "training" / "README.md", *sorted(ROOT.glob("weights/*/*.md")),
        *sorted(ROOT.glob("weights/*/*/*.md"))]


def documented_commands() -> list[tuple[str, str]]:
    """(document, argv after ``python -m``) of every ``python -m training...`` command in the README files and
    model cards: in code blocks (continuation lines joined, comments cut) and in inline code."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        lines = [ln for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
                 for ln in block.replace("\\\n", " ").splitlines()]
        lines += [" ".join(span.split()) for span in re.findall(r"`(python -m training[^`]*)`", text)]
        for line in lines:
            m = re.search(r"python -m (training\S*(?: .*)?)$", " ".join(line.split(" # ")[0].split()))
            if m and "..." not in m.group(1):
                found.append((str(doc.relative_to(ROOT)), m.group(1)))
    return found


def test_documented_commands_are_found() -> None:
    words = {argv.split()[1] for _, argv in documented_commands() if argv.startswith("training ")}
    assert set(COMMANDS) <= words, set(COMMANDS) - words
    assert any(LIVE_RESUME.split(" run.progress")[0] in argv for _, argv in documented_commands())


@pytest.mark.parametrize("doc, argv", documented_commands(), ids=lambda x: x[:60])
def test_documented_commands_parse_and_build_their_configs(doc: str, argv: str, capsys) -> None:
    """Every documented command still parses; training commands build and validate their config, XQ-GAN TOML
    commands pass ``--check`` (the model is built on the meta device), all without training."""
    module, *words = shlex.split(argv)
    if module == "training":
        args = build_parser().parse_args(words)
        if isinstance(COMMANDS[args.command], TrainCommand):
            assert build_train_config(COMMANDS[args.command], args).kind == COMMANDS[args.command].kind
    elif module == "training.xqgan":
        from training.xqgan.__main__ import main as xqgan_main

        if words:
            assert xqgan_main([*words, "--check"]) == 0, capsys.readouterr().err
    else:
        assert module in ("training.xqgan.compare", "training.grids", "training.experiments.bottleneck_ab"), module


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    opt = C.OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 0.0, opt) == pytest.approx(0.1)
    assert lr_factor(9, 0.0, opt) == pytest.approx(1.0)
    assert lr_factor(10, 0.0, opt) == pytest.approx(1.0)
    assert lr_factor(50, 0.5, opt) == pytest.approx(0.55)
    assert lr_factor(99, 1.0, opt) == pytest.approx(0.1)
    assert lr_factor(500, 3.0, opt) == pytest.approx(0.1)


def test_ema_tracks_the_model() -> None:
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.model.weight.clone()
    for _ in range(50):
        ema.update(model)
    assert not torch.equal(before, ema.model.weight)
    torch.testing.assert_close(ema.model.weight, model.weight)


def test_tokenizer_option_records_that_tokenizer_not_the_configs_default(tmp_path) -> None:
    """``--tokenizer runs/x/export`` on a config whose export names ``default-tokenizer``: the export names the
    given folder as the server will (``x-export``) and the sha256 of its weights; the server pairs by that."""
    import models
    from models.hub import weights_sha256
    from training.generator import build_generator

    folder = tmp_path / "runs" / "x" / "export"
    torch.manual_seed(0)
    models.save_pretrained(models.create_model("softvq-tiny-64"), folder)
    args = build_parser().parse_args(["generator", "--config", "generator-tiny", "--tokenizer", str(folder),
                                      "model=sit-tiny-64x32", "tokenizer_ref=default-tokenizer"])
    assert build_train_config(COMMANDS["generator"], args).tokenizer_ref == "default-tokenizer"  # an explicit ref is kept
    args = build_parser().parse_args(["generator", "--config", "generator-default", "--tokenizer", str(folder),
                                      "model=sit-tiny-64x32"])
    cfg = build_train_config(COMMANDS["generator"], args)
    assert named.get_named("generator-default").tokenizer_ref == "default-tokenizer"
    assert cfg.tokenizer_ref == "x-export"
    gen = build_generator(cfg, [1, 2], cfg.tokenizer_ref)
    assert gen.config.tokenizer == "x-export" and gen.config.tokenizer_sha256 == weights_sha256(folder)
    assert len(gen.config.tokenizer_sha256) == 64
