"""ImageFolder / XQ-GAN SC tokenizer: published key layouts (meta device), the encoder / decoder against an
independent reproduction on timm's own ViT, the code round trip, VAR helpers and checkpoint I/O."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT

from models.hub import CheckpointError, load_into, load_pretrained, save_pretrained
from models.imagefolder import ImageFolderConfig, ImageFolderModel, level_layout
from models.quantizers.msrq import IMAGEFOLDER_SCALES, MultiScaleResidualQuantizer
from models.registry import config_from_dict, config_to_dict, create_model, describe, get_config, list_models

TINY = "imagefolder-tiny-64"
# FORMATS.md 2.2: name -> (codebook size, branches, code dim, scales)
PUBLISHED = {
    "imagefolder-msvr10p2-4096": (4096, 2, 32, IMAGEFOLDER_SCALES),
    "imagefolder-msvr10p2-8192": (8192, 2, 32, IMAGEFOLDER_SCALES),
    "imagefolder-msvr10p2-16384": (16384, 2, 32, IMAGEFOLDER_SCALES),
    "xqgan-vp2-4096": (4096, 2, 32, (16,)),
    "xqgan-vp2-16384": (16384, 2, 32, (16,)),
    "xqgan-vq-4096": (4096, 1, 64, (16,)),
    "xqgan-vq-8192": (8192, 1, 32, (16,)),
}


def _vit(prefix: str, d: int, depth: int, n_img: int, p: int, patch_embed: bool) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {f"{prefix}.cls_token": (1, 1, d), f"{prefix}.pos_embed": (1, 1 + n_img, d),
                                       f"{prefix}.norm.weight": (d,), f"{prefix}.norm.bias": (d,)}
    if patch_embed:
        out |= {f"{prefix}.patch_embed.proj.weight": (d, 3, p, p), f"{prefix}.patch_embed.proj.bias": (d,)}
    for i in range(depth):
        b = f"{prefix}.blocks.{i}"
        out |= {f"{b}.norm1.weight": (d,), f"{b}.norm1.bias": (d,), f"{b}.attn.qkv.weight": (3 * d, d),
                f"{b}.attn.qkv.bias": (3 * d,), f"{b}.attn.proj.weight": (d, d), f"{b}.attn.proj.bias": (d,),
                f"{b}.ls1.gamma": (d,), f"{b}.norm2.weight": (d,), f"{b}.norm2.bias": (d,),
                f"{b}.mlp.fc1.weight": (4 * d, d), f"{b}.mlp.fc1.bias": (4 * d,), f"{b}.mlp.fc2.weight": (d, 4 * d),
                f"{b}.mlp.fc2.bias": (d,), f"{b}.ls2.gamma": (d,)}
    return out


def _expected(v: int, g: int, c: int, scales: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """FORMATS.md 2.3, written out for a ViT-B/16 at 256 px."""
    s = scales[-1]
    out = {"encoder.latent_tokens": (1, g * s * s, 768), "encoder.lvl1LC": (1, 257 + g * s * s),
           "encoder.lvl_embed.weight": (1 + g, 768), "quant_conv.weight": (c, 768, 1, 1), "quant_conv.bias": (c,),
           "post_quant_conv.weight": (768, g * c, 1, 1), "post_quant_conv.bias": (768,),
           "decoder.mask_token": (1, 1, 768), "decoder.lvl1LC": (1, 257 + 1 + s * s),
           "decoder.lvl_embed.weight": (2, 768),
           "decoder.to_pixel.model.weight": (768, 768), "decoder.to_pixel.model.bias": (768,)}
    out |= _vit("encoder.model", 768, 12, 256, 16, True) | _vit("decoder.model", 768, 12, 256, 16, False)
    prefixes = ["quantize"] if g == 1 else [f"quantizes.{i}" for i in range(g)]
    for q in prefixes:
        out[f"{q}.embedding.weight"] = (v, c)
        if len(scales) > 1:
            out[f"{q}.ema_vocab_hit_SV"] = (len(scales), v)
            out |= {f"{q}.quant_resi.qresi_ls.{k}.weight": (c, c, 3, 3) for k in range(4)}
            out |= {f"{q}.quant_resi.qresi_ls.{k}.bias": (c,) for k in range(4)}
    return out


def _semantic_model() -> dict[str, torch.Tensor]:
    """The frozen DINOv2-B (patch 16, 256 px) saved as ``semantic_model.*`` in released files (meta)."""
    with torch.device("meta"):
        vit = TimmViT(img_size=256, patch_size=16, embed_dim=768, depth=12, num_heads=12, init_values=1e-5,
                      num_classes=0)
    return {f"semantic_model.{k}": t for k, t in vit.state_dict().items()}


def _meta(name: str) -> ImageFolderModel:
    with torch.device("meta"):
        return create_model(name)  # type: ignore[return-value]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_key_layout(name: str) -> None:
    model = _meta(name)
    sd = model.state_dict()
    shapes = {k: tuple(t.shape) for k, t in sd.items()}
    expected = _expected(*PUBLISHED[name])
    assert sorted(set(shapes) ^ set(expected)) == []
    assert shapes == expected
    assert sd["encoder.lvl1LC"].dtype == torch.long and sd["decoder.lvl1LC"].dtype == torch.long
    v, g, _, scales = PUBLISHED[name]
    assert model.kind == "discrete" and model.code_shape == (g, sum(p * p for p in scales))


def test_msvr10p2_4096_has_552_tensors_and_loads_with_its_semantic_model() -> None:
    model = _meta("imagefolder-msvr10p2-4096")
    own = model.state_dict()
    semantic = _semantic_model()
    assert len(own) == 378 and len(semantic) == 174 and len(own) + len(semantic) == 552
    nbytes = 4 * sum(t.numel() for t in [*own.values(), *semantic.values()])
    assert round(nbytes / 1e9, 3) == 1.033  # FORMATS.md 2.3: 1.033 GB fp32
    assert round(sum(t.numel() for t in semantic.values()) / 1e6, 1) == 85.9
    load_into(model, {**own, **semantic})  # strict: semantic_model.* is ignored, everything else matches
    assert model.code_shape == (2, 286)
    structure = model.code_structure.as_dict()
    assert structure["shape"] == [2, 286] and structure["scales"] == list(IMAGEFOLDER_SCALES)
    assert structure["codebook_size"] == 4096 and structure["branches"] == 2
    with pytest.raises(CheckpointError, match="missing"):
        load_into(model, {k: t for k, t in own.items() if k != "quantizes.1.embedding.weight"})
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_into(model, {**own, "quantizes.0.embedding.weight": torch.empty(8192, 32, device="meta")})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_into(model, {**own, "quantizes.2.embedding.weight": torch.empty(4096, 32, device="meta")})


def test_vq_configs_ignore_the_usage_buffer() -> None:
    for name, keys in (("xqgan-vp2-4096", ["quantizes.0", "quantizes.1"]), ("xqgan-vq-4096", ["quantize"])):
        model = _meta(name)
        sd = dict(model.state_dict())
        sd |= {f"{k}.ema_vocab_hit_SV": torch.empty(PUBLISHED[name][0], device="meta") for k in keys}
        load_into(model, sd)


def test_level_layouts() -> None:
    enc = level_layout(257, [121, 121])
    assert enc.shape == (1, 499) and enc.dtype == torch.long
    assert enc[0, :257].eq(0).all() and enc[0, 257:378].eq(1).all() and enc[0, 378:].eq(2).all()
    dec = level_layout(257, [122])
    assert dec.shape == (1, 379) and dec[0, :257].eq(0).all() and dec[0, 257:].eq(1).all()
    model = create_model(TINY)  # 64 px / patch 8: 64 patches, 2 branches of 4 x 4
    assert torch.equal(model.encoder.lvl1LC, level_layout(65, [16, 16]))
    assert torch.equal(model.decoder.lvl1LC, level_layout(65, [17]))


def test_registry_and_config_json() -> None:
    names = set(list_models("imagefolder"))
    assert set(PUBLISHED) | {TINY} <= names and all(describe(n) for n in names)
    for name in [*PUBLISHED, TINY]:
        cfg = get_config(name)
        model = _meta(name)
        cls, back = config_from_dict(config_to_dict(model))
        assert cls is ImageFolderModel and back == cfg
    with pytest.raises(ValueError, match="last scale"):
        ImageFolderConfig(scales=(4, 2))


def test_from_official_args() -> None:
    # configs/MSVR10P2-4096.yaml of the release (the fields the architecture depends on)
    args = {"image_size": 256, "enc_type": "dinov2", "dec_type": "dinov2", "codebook_embed_dim": 32,
            "codebook_size": 4096, "abs_pos_embed": True, "product_quant": 2, "codebook_drop": 0.1,
            "encoder_model": "vit_base_patch14_dinov2.lvd142m", "decoder_model": "vit_base_patch14_dinov2.lvd142m",
            "num_latent_tokens": 121, "v_patch_nums": [1, 1, 2, 3, 3, 4, 5, 6, 8, 11], "start_drop": 3}
    assert ImageFolderConfig.matches_official(args)
    cfg = ImageFolderConfig.from_official(args)
    assert dataclasses.replace(cfg, notes="") == dataclasses.replace(get_config("imagefolder-msvr10p2-4096"),
                                                                     notes="", trained_on="")
    with pytest.raises(ValueError, match="lfq"):
        ImageFolderConfig.from_official({**args, "lfq": True})


# ------------------------------------------------------------------------------------------- numerics


@pytest.fixture(scope="module")
def tiny() -> ImageFolderModel:
    torch.manual_seed(0)
    model = create_model(TINY).eval()
    with torch.no_grad():  # make the random model less degenerate: visible positions and levels
        model.encoder.latent_tokens.normal_(std=0.5)
        model.decoder.mask_token.normal_(std=0.5)
    return model  # type: ignore[return-value]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 64, 64, generator=g) * 2 - 1


def _timm_vit(model: torch.nn.Module, d: int, heads: int) -> TimmViT:
    """timm's own ViT (what the published code builds) carrying our weights; dynamic_img_size gives its
    ``_pos_embed`` the 4-D (B, H, W, C) path that resamples the position table."""
    vit = TimmViT(img_size=64, patch_size=8, embed_dim=d, depth=2, num_heads=heads, init_values=1e-5,
                  num_classes=0, dynamic_img_size=True).eval()
    sd = model.state_dict()
    own = vit.state_dict()
    vit.load_state_dict({k: sd.get(k, own[k]) for k in own})  # the decoder has no patch_embed: keep timm's
    return vit


def test_encoder_matches_timm_reproduction(tiny: ImageFolderModel, images: torch.Tensor) -> None:
    enc = tiny.encoder
    vit = _timm_vit(enc.model, 64, 2)
    with torch.no_grad():
        x = vit._pos_embed(vit.patch_embed(images))  # [cls, 64 patches] + pos
        b, g, s = images.shape[0], 2, 4
        z = enc.latent_tokens.expand(b, -1, -1).reshape(b, g * s, s, -1)
        parts = [vit._pos_embed(zi)[:, 1:] for zi in z.chunk(g, dim=1)]  # grid pos, cls dropped
        x = torch.cat([x, *parts], dim=1) + enc.lvl_embed(enc.lvl1LC.expand(b, -1))
        ref = vit.norm(vit.blocks(vit.norm_pre(x)))[:, -g * s * s:]
        ours = enc(images)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_decoder_matches_timm_reproduction(tiny: ImageFolderModel) -> None:
    dec = tiny.decoder
    vit = _timm_vit(dec.model, 64, 2)
    z = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = vit._pos_embed(dec.mask_token.expand(2, 64, -1).reshape(2, 8, 8, -1))  # 8 x 8 grid: pos as is
        zz = vit._pos_embed(z.reshape(2, 4, 4, -1))  # [cls, 16 latents] with the resampled table
        x = torch.cat([x, zz], dim=1) + dec.lvl_embed(dec.lvl1LC.expand(2, -1))
        h = vit.norm(vit.blocks(x))[:, 1:65]
        p = dec.to_pixel.model(h).reshape(2, 8, 8, 8, 8, 3)
        ref = torch.einsum("nhwpqc->nchpwq", p).reshape(2, 3, 64, 64)
        ours = dec(z)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_features_are_quant_conv_of_branch_tokens(tiny: ImageFolderModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        h = tiny.encoder(images)  # (B, 32, 64)
        f = tiny.features(images)  # (B, 16, 4, 4)
        w, bias = tiny.quant_conv.weight[:, :, 0, 0], tiny.quant_conv.bias
        for g in range(2):
            tokens = h[:, g * 16:(g + 1) * 16] @ w.t() + bias  # (B, 16, 8): branch g, row-major grid
            torch.testing.assert_close(f[:, g * 8:(g + 1) * 8].flatten(2).transpose(1, 2), tokens)


def test_codes_round_trip_exactly(tiny: ImageFolderModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        codes = tiny.encode(images)
        assert codes.shape == (3, 2, 30) and codes.dtype == torch.long
        assert 0 <= int(codes.min()) and int(codes.max()) < 64
        f_hat = tiny.quantize(images)
        assert f_hat.shape == (3, 16, 4, 4)
        recon = tiny.decode_fhat(f_hat)
        assert torch.equal(tiny.decode(codes), recon)
        assert float(recon.abs().max()) <= 1.0
        # each branch is its own multi-scale quantizer on its channel group
        f = tiny.features(images)
        for g, q in enumerate(tiny.quantizes):
            assert torch.equal(codes[:, g], q(f[:, g * 8:(g + 1) * 8]).indices)
        # the straight-through training output carries the same values
        out = tiny(images)
        torch.testing.assert_close(out.quantized, f_hat, atol=1e-6, rtol=0)
        assert torch.equal(out.codes, codes)
        torch.testing.assert_close(out.reconstruction.clamp(-1, 1), recon, atol=1e-5, rtol=0)
    assert set(out.quantizer.losses) == {"codebook", "commitment"}


def test_codes_per_sample_do_not_depend_on_batch(tiny: ImageFolderModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        codes = tiny.encode(images)
        single = torch.cat([tiny.encode(images[i:i + 1]) for i in range(3)])
    assert torch.equal(codes, single)


def test_var_helpers_rebuild_fhat(tiny: ImageFolderModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        codes = tiny.encode(images)
        f_hat = torch.zeros(3, 16, 4, 4)
        bounds = [0, 1, 5, 14, 30]
        inputs = []
        for si in range(4):
            f_hat, nxt = tiny.next_scale_input(si, f_hat, codes[:, :, bounds[si]:bounds[si + 1]])
            if si < 3:
                assert nxt.shape == (3, 16, si + 2, si + 2)
                inputs.append(nxt.flatten(2).transpose(1, 2))
        torch.testing.assert_close(f_hat, tiny.codes_to_fhat(codes), atol=1e-6, rtol=0)
        tf = tiny.teacher_forcing_input(codes)
        assert tf.shape == (3, 29, 16)
        torch.testing.assert_close(tf, torch.cat(inputs, dim=1), atol=1e-6, rtol=0)
        # scale 0's codes embedded: un-normalised codebook rows of each branch
        e = tiny.embed_scale(0, codes[:, :, :1])
        assert torch.equal(e[:, :8, 0, 0], tiny.quantizes[0].embedding.weight[codes[:, 0, 0]])


def test_dropped_scales_decode_as_zero(tiny: ImageFolderModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        codes = tiny.encode(images[:1])
        partial = codes.clone()
        partial[:, :, 14:] = -1  # keep scales 0..2
        q: MultiScaleResidualQuantizer = tiny.quantizes[0]
        kept = torch.full((1, 30), -1, dtype=torch.long)
        kept[:, :14] = codes[:, 0, :14]
        ref = q.indices_to_codes(kept)
        torch.testing.assert_close(tiny.codes_to_fhat(partial)[:, :8], ref)
        with pytest.raises(ValueError, match="codes must lie"):
            tiny.decode(codes + 64)
        with pytest.raises(ValueError, match="expected codes"):
            tiny.decode(codes[:, :, :29])
        with pytest.raises(ValueError, match="expected images"):
            tiny.encode(images[:, :, :32])


@pytest.mark.parametrize("overrides", [dict(scales=(4,)), dict(num_branches=1, code_dim=16)])
def test_vq_and_single_branch_variants(overrides: dict, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_config(TINY), **overrides)
    model = ImageFolderModel(cfg).eval()
    keys = set(model.state_dict())
    g = cfg.num_branches
    if g == 1:
        assert "quantize.embedding.weight" in keys and not any(k.startswith("quantizes.") for k in keys)
    if len(cfg.scales) == 1:
        assert not any("quant_resi" in k or "ema_vocab_hit_SV" in k for k in keys)
    with torch.no_grad():
        codes = model.encode(images)
        assert codes.shape == (3, g, cfg.num_codes)
        assert torch.equal(model.decode(codes), model.decode_fhat(model.quantize(images)))
        if len(cfg.scales) == 1:  # cosine VQ: f_hat holds normalised codebook rows, nearest by cosine
            f_hat, f, c = model.quantize(images), model.features(images), cfg.code_dim
            for b, q in enumerate(model.branch_quantizers):
                norms = f_hat[:, b * c:(b + 1) * c].norm(dim=1)
                torch.testing.assert_close(norms, torch.ones_like(norms))
                feats = F.normalize(f[:, b * c:(b + 1) * c].flatten(2).transpose(1, 2), dim=-1)
                cb = F.normalize(q.embedding.weight, dim=-1)
                assert torch.equal(codes[:, b], (feats @ cb.t()).argmax(-1))


def test_save_load_round_trip_and_semantic_model(tiny: ImageFolderModel, images: torch.Tensor, tmp_path) -> None:
    folder = save_pretrained(tiny, tmp_path / "tok")
    back = load_pretrained(folder)
    assert isinstance(back, ImageFolderModel) and back.config == tiny.config
    sd, sd2 = tiny.state_dict(), back.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(back.encode(images), tiny.encode(images))
    # a released-style state dict: semantic model, discriminator and usage statistics beside the weights
    fresh = create_model(TINY)
    extra = {"semantic_model.cls_token": torch.zeros(1, 1, 64), "semantic_model.blocks.0.attn.qkv.weight":
             torch.zeros(192, 64), "discriminator.conv.weight": torch.zeros(4, 3, 3, 3),
             "decoder.model.patch_embed.proj.weight": torch.zeros(64, 3, 8, 8)}
    load_into(fresh, {**sd, **extra})
    assert all(torch.equal(fresh.state_dict()[k], sd[k]) for k in sd)
    without_usage = {k: t for k, t in sd.items() if not k.endswith("ema_vocab_hit_SV")}
    load_into(create_model(TINY), without_usage)  # usage statistics are optional


def test_latent_position_table_is_the_resampled_vit_table(tiny: ImageFolderModel) -> None:
    from timm.layers import resample_abs_pos_embed

    pos = tiny.encoder.model.pos_embed  # (1, 65, 64): [cls, 8 x 8]
    table = resample_abs_pos_embed(pos, [4, 4], num_prefix_tokens=1)
    grid = pos[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    manual = F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True).flatten(2).transpose(1, 2)
    torch.testing.assert_close(table[:, 1:], manual)
    assert torch.equal(table[:, :1], pos[:, :1])  # the cls slot is kept as is
