"""CODA tokenizer: the real TAEF2 inside it loads strictly, codes round-trip exactly, the published
mar_v16384 layout (FORMATS.md 3.2-3.3), save/load, LoRA merging and gradients. Two 64x64 images at most."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.coda import CODA, CODAConfig, infer_quantizer_fields
from models.hub import CheckpointError, load_pretrained, save_pretrained
from models.kl16 import KL16, KL16Config
from models.registry import create_model, get_config, list_models
from models.taef2 import DEFAULT_WEIGHTS, TAEF2

HAVE_TAEF2 = (Path(DEFAULT_WEIGHTS) / "taef2_encoder.pth").exists()
needs_taef2 = pytest.mark.skipif(not HAVE_TAEF2, reason="shared TAEF2 weights not present")


@pytest.fixture(scope="module")
def coda() -> CODA:
    """coda-taef2-64 on the real TAEF2 weights, with randomised LoRA up-projections (so LoRA matters)."""
    if not HAVE_TAEF2:
        pytest.skip("shared TAEF2 weights not present")
    torch.manual_seed(0)
    model = CODA.with_pretrained_vae(get_config("coda-taef2-64")).eval()
    with torch.no_grad():
        for name, p in model.vae.named_parameters():
            if name.endswith("lora_layer.up.weight"):
                p.normal_(0, 1e-3)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 64, 64, generator=g) * 2 - 1


def test_named_configs() -> None:
    assert {"coda-taef2-64", "coda-mar-v16384"} <= set(list_models("coda"))
    cfg = get_config("coda-taef2-64")
    assert (cfg.vae, cfg.image_size, cfg.latent_dim, cfg.attn_dim, cfg.latent_side) == ("taef2", 64, 32, 32, 8)
    assert cfg.num_tokens == 130 and cfg.lora_rank > 0
    with pytest.raises(ValueError, match="last scale"):
        CODAConfig(scales=(1, 2, 4))
    with pytest.raises(ValueError, match="latent_dim"):
        CODAConfig(latent_dim=16)


@needs_taef2
def test_taef2_inside_coda_loads_strictly_and_starts_as_taef2(images: torch.Tensor, tmp_path: Path) -> None:
    model = CODA.with_pretrained_vae(get_config("coda-taef2-64")).eval()
    for part in ("encoder", "decoder"):
        ref = torch.load(Path(DEFAULT_WEIGHTS) / f"taef2_{part}.pth", weights_only=True)
        own = {k: v for k, v in getattr(model.vae, part).state_dict().items() if ".lora_layer." not in k}
        assert set(own) == set(ref) and all(torch.equal(own[k], ref[k]) for k in ref)
    taef2 = TAEF2.from_original()
    with torch.no_grad():  # LoRA's up-projection starts at zero: exactly the pretrained autoencoder
        z = model.encode_latents(images)
        assert torch.equal(z, taef2.encode_spatial(images))
        assert torch.equal(model.decode_latents(z), taef2.decode_spatial(z))
    assert not any(p.requires_grad for n, p in model.vae.named_parameters() if ".lora_layer." not in n)
    # strict: a folder with a key missing is refused
    for part in ("encoder", "decoder"):
        sd = torch.load(Path(DEFAULT_WEIGHTS) / f"taef2_{part}.pth", weights_only=True)
        if part == "decoder":
            sd.pop("19.bias")
        torch.save(sd, tmp_path / f"taef2_{part}.pth")
    with pytest.raises(RuntimeError, match="19.bias"):
        CODA.with_pretrained_vae(get_config("coda-taef2-64"), tmp_path)


@needs_taef2
def test_decode_equals_the_quantized_reconstruction_exactly(coda: CODA, images: torch.Tensor) -> None:
    with torch.no_grad():
        out = coda(images)
        codes = coda.encode(images)
        assert codes.shape == (2, 130) and codes.dtype == torch.int64
        assert torch.equal(codes, out.codes)
        assert 0 <= int(codes.min()) and int(codes.max()) < coda.codebook_size
        assert torch.equal(coda.codes_to_latents(codes), out.quantizer.quantized)
        rec = coda.decode(codes)
        assert torch.equal(rec, out.reconstruction) and torch.equal(coda.decode(codes), rec)
        assert rec.shape == (2, 3, 64, 64) and rec.min() >= -1 and rec.max() <= 1
        # the coarsest scale alone is a (B, 1) block: its code is the first one of each row
        first = coda.quantizer.split_indices(codes)[0]
        assert torch.equal(first, codes[:, :1])
    with pytest.raises(ValueError):
        coda.decode(torch.full((1, 130), coda.codebook_size))
    with pytest.raises(ValueError):
        coda.decode(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError):
        coda.encode(torch.zeros(1, 3, 32, 32))


def test_code_structure() -> None:
    model = create_model("coda-taef2-64", lora_rank=0, codebook_size=16)
    cs = model.code_structure
    assert cs.scales == (1, 2, 3, 4, 6, 8) and cs.offsets == (0, 1, 5, 14, 30, 66) and cs.axes == ("position",)
    s = cs.as_dict()  # what /v1/models shows
    assert s["scales"] == [1, 2, 3, 4, 6, 8] and s["offsets"] == [0, 1, 5, 14, 30, 66]
    assert s["shape"] == [130] and 130 == s["offsets"][-1] + 64 and s["codebook_size"] == 16
    assert s["branches"] == 1 and s["dtype"] == "int64" and s["code_dim"] == 32
    assert s["latent_shape"] == [32, 8, 8] and model.kind == "discrete" and model.token_shape == (130,)
    assert model.token_spec.kind == "discrete" and model.token_spec.code_structure == cs


def test_published_mar_v16384_layout() -> None:
    cfg = get_config("coda-mar-v16384")
    assert cfg.num_tokens == 680 and cfg.codebook_size == 16384 and cfg.latent_side == 16
    with torch.device("meta"):
        model = create_model("coda-mar-v16384")
        stock = KL16(KL16Config()).state_dict()
    sd = model.state_dict()
    q = {k.removeprefix("quantizer."): tuple(v.shape) for k, v in sd.items() if k.startswith("quantizer.")}
    assert q == {"codebooks.weight": (16384, 16), "attn.to_q.weight": (32, 16), "attn.to_q.bias": (32,),
                 "attn.to_k.weight": (32, 16), "attn.to_k.bias": (32,), "attn.to_v.weight": (16, 16),
                 "attn.to_v.bias": (16,), "attn.norm_q.weight": (32,), "attn.norm_k.weight": (32,)}
    vae = {k.removeprefix("vae."): v for k, v in sd.items() if k.startswith("vae.")}
    lora = {k: v for k, v in vae.items() if ".lora_layer." in k}
    assert set(vae) - set(lora) == set(stock)  # base conv keys keep the stock MAR names
    # measured: 56 LoRA tensors in the encoder, 76 in the decoder, 6.0 M parameters at r = 32
    assert sum(k.startswith("encoder.") for k in lora) == 56 and sum(k.startswith("decoder.") for k in lora) == 76
    assert round(sum(v.numel() for v in lora.values()) / 1e6, 1) == 6.0
    for k, v in lora.items():
        base = stock[k.split(".lora_layer.")[0] + ".weight"]
        if k.endswith("down.weight"):
            assert tuple(v.shape) == (32, base.shape[1], *base.shape[2:]), k
        else:
            assert tuple(v.shape) == (base.shape[0], 32, 1, 1), k
    assert {k.split(".lora_layer.")[0].split(".")[-1] for k in lora} == {"conv1", "conv2", "conv"}
    assert all("upsample" in k or "downsample" in k for k in lora if ".conv.lora_layer" in k)


def test_published_quantizer_file_loads_strictly() -> None:
    model = create_model("coda-taef2-64", lora_rank=0, codebook_size=64)
    g = torch.Generator().manual_seed(0)
    published = {k: torch.randn(v.shape, generator=g) for k, v in model.quantizer.state_dict().items()}
    assert infer_quantizer_fields(published) == {"codebook_size": 64, "latent_dim": 32, "attn_dim": 32,
                                                 "rms_norm": True}
    model.load_published_quantizer(published)
    assert torch.equal(model.quantizer.attn.to_v.weight, published["attn.to_v.weight"])
    with pytest.raises(CheckpointError, match="missing"):
        model.load_published_quantizer({k: v for k, v in published.items() if k != "attn.norm_k.weight"})
    with pytest.raises(CheckpointError, match="wrong shapes"):
        model.load_published_quantizer({**published, "codebooks.weight": torch.zeros(32, 32)})


def test_from_published_files_reproduces_the_model(tmp_path: Path, images: torch.Tensor) -> None:
    torch.manual_seed(3)
    cfg = dataclasses.replace(get_config("coda-taef2-64"), codebook_size=32)
    src = CODA(cfg).eval()
    with torch.no_grad():
        for layer in src.vae.modules():
            if hasattr(layer, "lora_layer") and layer.lora_layer is not None:
                layer.lora_layer.up.weight.normal_(0, 0.01)
    save_file({k: v.contiguous() for k, v in src.vae.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    save_file(src.quantizer.state_dict(), str(tmp_path / "quantizer.safetensors"))
    loaded = CODA.from_published(tmp_path / "vae.safetensors", tmp_path / "quantizer.safetensors", cfg)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images[:1]), src.encode(images[:1]))


@needs_taef2
def test_save_load_round_trip_carries_the_taef2_weights(coda: CODA, images: torch.Tensor, tmp_path: Path) -> None:
    save_pretrained(coda, tmp_path / "coda")
    loaded = load_pretrained(tmp_path / "coda")
    assert isinstance(loaded, CODA) and loaded.config == coda.config
    ref = torch.load(Path(DEFAULT_WEIGHTS) / "taef2_encoder.pth", weights_only=True)
    assert torch.equal(loaded.vae.encoder.state_dict()["1.conv.0.weight"], ref["1.conv.0.weight"])
    with torch.no_grad():
        codes = coda.encode(images)
        assert torch.equal(loaded.encode(images), codes)
        assert torch.equal(loaded.decode(codes), coda.decode(codes))


@needs_taef2
def test_merged_copy_matches_and_has_the_plain_layout(coda: CODA, images: torch.Tensor) -> None:
    merged = coda.merged()
    assert merged.config.lora_rank == 0 and not any(".lora_layer." in k for k in merged.state_dict())
    with torch.no_grad():
        z, zm = coda.encode_latents(images), merged.encode_latents(images)
        taef2 = TAEF2.from_original()
        assert (z - taef2.encode_spatial(images)).abs().max() > 1e-2  # the LoRA does act (~0.07)...
        torch.testing.assert_close(zm, z, rtol=0, atol=1e-4)  # ...and survives merging (~3e-6)
        codes = coda.encode(images)
        f_hat = coda.codes_to_latents(codes)
        assert (coda.decode_latents(f_hat) - taef2.decode_spatial(f_hat)).abs().max() > 1e-3
        torch.testing.assert_close(merged.decode(codes), coda.decode(codes), rtol=0, atol=1e-4)


def test_gradients_reach_lora_and_quantizer_only() -> None:
    torch.manual_seed(0)
    model = create_model("coda-taef2-64", codebook_size=16, image_size=64).train()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    out = model(x)
    ((out.reconstruction - x).square().mean() + out.quantizer.loss).backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    ups = [p for n, p in model.vae.named_parameters() if n.endswith("lora_layer.up.weight")]
    assert ups and all(p.grad is not None for p in ups) and sum(float(p.grad.abs().sum()) for p in ups) > 0
    assert model.quantizer.codebooks.weight.grad is not None
    assert all(p.grad is None for n, p in model.vae.named_parameters() if ".lora_layer." not in n)
