"""The feature cache (TAEF2 latents + EfficientNet-Lite0 features of real images) and the latent-space
training of a softvq-taef2 tokenizer: the cache equals the frozen networks' outputs and resumes, a few
steps on real latents lower the loss, the export serves (encode / decode) and carries measured statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models.taef2 import DEFAULT_WEIGHTS, TAEF2
from training.config import apply_overrides
from training.data import load_images, tiny_imagenet_validation, to_float
from training.feature_cache import FeatureCacheConfig, build_feature_cache, open_feature_cache
from training.named import get_named

pytestmark = pytest.mark.skipif(
    not (Path(DEFAULT_WEIGHTS) / "taef2_encoder.pth").exists() or not tiny_imagenet_validation()[0].exists(),
    reason="shared TAEF2 weights or Tiny ImageNet not present")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "tiny-val-96"
    build_feature_cache(FeatureCacheConfig(source="tiny-val", out=str(out), max_images=96, chunk=40,
                                           runtime="torch", lite_resolution=64, lite_grid=2, threads=1))
    return out


def test_cache_holds_the_frozen_outputs_of_real_images(cache_dir: Path) -> None:
    cache = open_feature_cache(cache_dir)
    assert len(cache) == 96 and cache.latents.shape == (96, 32, 8, 8) and cache.lite.shape == (96, 1280, 2, 2)
    assert cache.latents.dtype == np.float16 and cache.meta["done"] == 96
    real = load_images("tiny-val", 64, max_images=96)
    assert np.array_equal(cache.labels, real.labels.numpy())
    with torch.no_grad():
        z = TAEF2.from_original().encode_spatial(to_float(real.images[80:88]))
    np.testing.assert_allclose(cache.latents[80:88].astype(np.float32), z.numpy(), atol=2e-2, rtol=1e-2)
    assert float(np.abs(cache.lite[:8].astype(np.float32)).mean()) > 0.01  # real activations, not zeros


def test_onnx_cache_matches_and_resumes(tmp_path, cache_dir: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    cfg = FeatureCacheConfig(source="tiny-val", out=str(out), max_images=24, chunk=8, runtime="onnx",
                             lite_resolution=64, threads=1)
    build_feature_cache(cfg)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["runtime"] == {"taef2": "onnx", "lite0": "onnx"} and meta["done"] == 24
    ref = open_feature_cache(cache_dir)
    got = open_feature_cache(out)
    np.testing.assert_allclose(got.latents.astype(np.float32), ref.latents[:24].astype(np.float32), atol=1e-2)
    # an interrupted run (done = 8) continues from row 8 and leaves rows before it alone
    first = got.latents[:8].copy()
    meta["done"] = 8
    (out / "meta.json").write_text(json.dumps(meta))
    arr = np.load(out / "taef2.npy", mmap_mode="r+")
    arr[8:] = 0
    arr.flush()
    del arr
    build_feature_cache(cfg)
    again = open_feature_cache(out)
    assert again.meta["done"] == 24 and np.array_equal(again.latents[:8], first)
    np.testing.assert_allclose(again.latents.astype(np.float32), ref.latents[:24].astype(np.float32), atol=1e-2)


def test_unfinished_cache_is_refused(tmp_path, cache_dir: Path) -> None:
    meta = json.loads((cache_dir / "meta.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("taef2.npy", "lite0.npy", "labels.npy"):
        (bad / name).write_bytes((cache_dir / name).read_bytes())
    (bad / "meta.json").write_text(json.dumps({**meta, "done": 10}))
    with pytest.raises(ValueError, match="unfinished"):
        open_feature_cache(bad)


def test_a_few_steps_lower_the_loss_and_the_export_serves(tmp_path, cache_dir: Path) -> None:
    from training.softvq_taef2 import train_softvq_taef2

    cfg = apply_overrides(get_named("softvq-taef2-tiny"), [
        f"cache={cache_dir}", f"val_cache={cache_dir}", f"run.out_dir={tmp_path / 'run'}", "run.steps=40",
        "run.sample_every=40", "run.progress=none"])
    out = train_softvq_taef2(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["grid_mse"] for r in rows if "grid_mse" in r]
    assert losses[-1] < 0.9 * losses[0], losses
    evals = [r for r in rows if r.get("event") == "eval"]
    assert evals and 5 < evals[-1]["val_psnr"] < 40 and 0 < evals[-1]["val_grid_rel_mse"] < 1.5

    model = models.load_pretrained(out)
    stats = json.loads((tmp_path / "run" / "export_stats.json").read_text())
    assert model.config.vq_std == pytest.approx(stats["vq_std"]) and 0 < model.config.vq_std < 1
    assert model.config.latent_scale != 1.0  # measured on the cache
    real = load_images("tiny-val", 64, max_images=2)
    with torch.no_grad():
        tokens = model.encode(to_float(real.images))
        images = model.decode(tokens)
    assert tokens.shape == (2, 32, 16) and images.shape == (2, 3, 64, 64)
    # the frozen TAEF2 in the export is the pretrained one (fp16-rounded)
    ref = TAEF2.from_original().state_dict()
    torch.testing.assert_close(model.vae.state_dict()["encoder.0.weight"], ref["encoder.0.weight"],
                               atol=1e-3, rtol=1e-3)


def test_a_wip_folder_continues_the_run(tmp_path, cache_dir: Path) -> None:
    from safetensors.torch import load_file

    from training.softvq_taef2 import train_softvq_taef2

    wip = tmp_path / "wip"
    base = [f"cache={cache_dir}", f"val_cache={cache_dir}", "run.steps=30", "run.progress=none", "val_images=4"]
    first = apply_overrides(get_named("softvq-taef2-tiny"), [
        *base, f"run.out_dir={tmp_path / 'a'}", "run.stop_at=12", "run.sample_every=12", f"wip_dir={wip}"])
    train_softvq_taef2(first)
    state = json.loads((wip / "wip.json").read_text())
    tensors = load_file(str(wip / "wip.safetensors"))
    assert state["step"] == 12 and state["images_seen"] == 12 * 16
    assert not any(".vae." in k for k in tensors)  # the frozen stem is not duplicated
    assert tensors["ema.encoder.latent_tokens"].dtype == torch.float16
    assert tensors["model.encoder.latent_tokens"].dtype == torch.float32

    # a fresh folder (no last.pt) resumes from the wip folder and finishes the schedule
    second = apply_overrides(get_named("softvq-taef2-tiny"), [
        *base, f"run.out_dir={tmp_path / 'b'}", f"run.resume_from={wip}", "run.sample_every=100"])
    out = train_softvq_taef2(second)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "resume_wip" and rows[0]["step"] == 12
    steps = [r["step"] for r in rows if "grid_mse" in r]
    assert steps[0] == 15 and steps[-1] == 30
    assert rows[-1]["images"] == 30 * 16 and models.load_pretrained(out).config.latent_shift == pytest.approx(
        state["model_config"]["latent_shift"])


def test_sit_trains_on_cached_tokens_with_representation_alignment(tmp_path, cache_dir: Path) -> None:
    from models.softvq_taef2 import SoftVQTAEF2
    from training.generator import train_generator

    torch.manual_seed(0)
    tok = SoftVQTAEF2.with_taef2(models.get_config("softvq-taef2-tiny", latent_shift=0.08, latent_scale=1.1))
    tok_dir = models.save_pretrained(tok.eval(), tmp_path / "tok")
    cfg = apply_overrides(get_named("generator-tiny"), [
        f"tokenizer={tok_dir}", f"feature_cache={cache_dir}", "encode_flip=true", "repa_weight=0.5",
        "repa_depth=1", "repa_hidden=32", 'model_overrides={"num_tokens": 32, "token_dim": 16}',
        f"run.out_dir={tmp_path / 'gen'}", "run.steps=40", "run.sample_every=40", "run.progress=none",
        "sample_steps=2"])
    out = train_generator(cfg)
    rows = [json.loads(line) for line in (tmp_path / "gen" / "metrics.jsonl").read_text().splitlines()]
    repa = [r["repa"] for r in rows if "repa" in r]
    assert repa and repa[-1] < repa[0] and all("flow" in r for r in rows if "repa" in r)
    # tokens came from the cached latents: 96 images and their mirrored copies, statistics written
    saved = torch.load(tmp_path / "gen" / "latents.pt", weights_only=True)
    assert saved["tokens"].shape == (192, 32, 16)
    with torch.no_grad():
        direct = tok.encode_latents(torch.from_numpy(open_feature_cache(cache_dir).latents[:4].astype(np.float32)),
                                    compute_losses=False).tokens
    torch.testing.assert_close(saved["tokens"][:4].float(), direct, atol=2e-3, rtol=1e-2)
    assert json.loads((tok_dir / "config.json").read_text())["vq_std"] != 1.0
    gen = models.load_pretrained(out)
    assert (gen.config.num_tokens, gen.config.token_dim) == (32, 16)
    assert not any(k.startswith("aligner") for k in gen.state_dict())  # the projector is training-only

    bad = apply_overrides(get_named("generator-tiny"), [f"tokenizer={tok_dir}", "repa_weight=0.5",
                                                        f"run.out_dir={tmp_path / 'bad'}"])
    with pytest.raises(ValueError, match="feature_cache"):
        train_generator(bad)


def test_the_comparison_recipes_differ_only_in_their_tokens() -> None:
    a, b = get_named("sit-softvq-taef2"), get_named("sit-taef2-64")
    assert a.model_overrides == b.model_overrides and a.optim == b.optim and a.repa_weight == b.repa_weight > 0
    assert models.get_config(a.model, **a.model_overrides).num_tokens == 32
    assert models.get_config(b.model, **b.model_overrides).num_tokens == 64
    assert a.run.batch_size == b.run.batch_size and a.feature_cache == b.feature_cache


def test_taef2_tokens_from_cached_latents_equal_encode(cache_dir: Path) -> None:
    taef2 = TAEF2.from_original()
    real = load_images("tiny-val", 64, max_images=4)
    with torch.no_grad():
        direct = taef2.encode(to_float(real.images))
    z = torch.from_numpy(open_feature_cache(cache_dir).latents[:4].astype(np.float32))
    torch.testing.assert_close(taef2.tokens_from_latents(z), direct, atol=2e-2, rtol=1e-2)


def test_the_committed_wip_folder_resumes_under_the_live_command(tmp_path) -> None:
    """The live run's exact resume command (its config validated by the CLI) rebuilds the model and the trainer
    and loads the committed weights/wip/softvq-taef2-32x64 folder: step, counters and EMA weights come back."""
    from safetensors.torch import load_file

    from training.__main__ import COMMANDS, build_parser, build_train_config
    from training.softvq_taef2 import build_model
    from training.trainer import Trainer

    root = Path(__file__).resolve().parents[2]
    wip = root / "weights" / "wip" / "softvq-taef2-32x64"
    args = build_parser().parse_args(["softvq-taef2", "--config", "softvq-taef2-32x64",
                                      f"run.resume_from={wip}", "run.steps=20000", "run.progress=log",
                                      f"run.out_dir={tmp_path / 'run'}"])
    cfg = build_train_config(COMMANDS["softvq-taef2"], args)
    model = build_model(cfg, cache=None)  # the wip's latent shift / scale: the cache is not read
    state = json.loads((wip / "wip.json").read_text())
    assert model.config.latent_shift == state["model_config"]["latent_shift"]
    trainer = Trainer(cfg, model, cfg.run)
    assert trainer.maybe_resume()
    assert (trainer.step, trainer.images_seen) == (state["step"], state["images_seen"])
    ema = load_file(str(wip / "wip.safetensors"))
    name = next(k for k in ema if k.startswith("ema.") and not k.startswith("ema.vae."))
    torch.testing.assert_close(trainer.ema.model.state_dict()[name[4:]].half(), ema[name])
