"""SiT / DiT generators: published key layout, numerics of the embeddings and blocks, checkpoint I/O."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import models
from models.dit import DiT, DiTConfig, sincos_1d, timestep_frequencies
from models.hub import CheckpointError, load_pretrained, save_pretrained
from models.registry import create_model, get_config, list_models
from models.sit import SiT, SiTConfig

PUBLISHED_SIT = {
    "sit-xl_softvq-l-64": (64, 32), "sit-xl_softvq-bl-64": (64, 32), "sit-xl_softvq-b-64": (64, 32),
    "sit-xl_softvq-l-32": (32, 64), "sit-xl_softvq-bl-32": (32, 64), "sit-xl_softvq-b-32": (32, 64),
    "sit-xl_softvq-bl-64-512": (64, 32), "sit-xl_softvq-l-32-512": (32, 64),
}
PUBLISHED_DIT = {"dit-xl_softvq-l-64": (64, 32), "dit-xl_softvq-l-32": (32, 64)}


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every trainable tensor random values (the published init zeroes the adaLN / output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def expected_shapes(L: int, C: int, D: int = 1152, depth: int = 28, out: int | None = None) -> dict[str, tuple]:
    out = out or C
    shapes = {
        "pos_embed": (1, L, D), "x_embedder.weight": (D, C), "x_embedder.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (1001, D),
        "final_layer.linear.weight": (out, D), "final_layer.linear.bias": (out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    return shapes


def meta_model(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(name)


# ----------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIT))
def test_published_sit_key_layout(name: str) -> None:
    L, C = PUBLISHED_SIT[name]
    model = meta_model(name)
    assert isinstance(model, SiT)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(L, C)
    assert len(sd) == 292
    assert model.config.tokenizer == name.split("_", 1)[1]
    assert (model.config.num_tokens, model.config.token_dim) == (L, C)


def test_sit_xl_byte_count_matches_release() -> None:
    sd = meta_model("sit-xl-64x32").state_dict()
    assert sum(v.numel() * v.element_size() for v in sd.values()) == 2_699_707_520


@pytest.mark.parametrize("name", sorted(PUBLISHED_DIT))
def test_published_dit_key_layout(name: str) -> None:
    L, C = PUBLISHED_DIT[name]
    model = meta_model(name)
    assert isinstance(model, DiT) and model.config.learn_sigma
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(L, C, out=2 * C)


def test_named_configs_cover_families_and_sizes() -> None:
    names = set(list_models())
    for n in ["sit-xl-64x32", "sit-xl-32x64", "dit-xl-64x32", "dit-xl-32x64", "sit-b-64x32", "sit-l-64x32",
              "sit-tiny-64x32", "sit-tiny-32x64", "sit-s-64x32", "dit-tiny-64x32", "dit-tiny-32x64",
              *PUBLISHED_SIT, *PUBLISHED_DIT]:
        assert n in names, n
    s = get_config("sit-s-64x32")
    assert 256 <= s.hidden_size <= 384 and 6 <= s.depth <= 8 and s.tokenizer == "softvq-s-64"
    t = get_config("sit-tiny-64x32")
    assert 64 <= t.hidden_size <= 128 and t.depth == 2
    assert get_config("sit-xl_softvq-l-64").sampler == "sde"
    assert get_config("dit-xl_softvq-l-64").sampler in ("ddpm", "ddim")


def test_paired_tokenizers_exist_with_the_same_token_shape() -> None:
    paired = 0
    for name in list_models():
        if name.startswith(("sit", "dit")) and get_config(name).tokenizer:
            g = get_config(name)
            tok = get_config(g.tokenizer)
            assert (tok.num_tokens, tok.token_dim) == (g.num_tokens, g.token_dim), name
            paired += 1
    assert paired >= len(PUBLISHED_SIT) + len(PUBLISHED_DIT) + 2


def test_pos_embed_is_fixed_interleaved_sincos() -> None:
    model = create_model("sit-tiny-64x32")
    pe = model.pos_embed
    assert not pe.requires_grad and "pos_embed" in model.state_dict()
    L, D = pe.shape[1:]
    pos = torch.arange(L, dtype=torch.float64)[:, None]
    w = torch.exp(torch.arange(0, D, 2, dtype=torch.float64) * -(math.log(10000.0) / D))
    torch.testing.assert_close(pe[0, :, 0::2].double(), torch.sin(pos * w), atol=1e-5, rtol=0)
    torch.testing.assert_close(pe[0, :, 1::2].double(), torch.cos(pos * w), atol=1e-5, rtol=0)
    # not the MAE/DiT concatenated layout
    assert not torch.allclose(pe[0, :, : D // 2].double(), torch.sin(pos * w), atol=1e-3)
    assert torch.equal(sincos_1d(L, D), pe[0])


def test_timestep_embedding_is_cos_then_sin() -> None:
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_frequencies(t, 256)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float64) / 128)
    args = t.double()[:, None] * freqs
    torch.testing.assert_close(emb.double(), torch.cat([torch.cos(args), torch.sin(args)], -1), atol=1e-6, rtol=0)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    # raw t for SiT: t = 1 is not rescaled by 1000
    sit = randomize(create_model("sit-tiny-64x32"))
    ref = sit.t_embedder.mlp(timestep_frequencies(torch.tensor([1.0])))
    assert torch.equal(sit.t_embedder(torch.tensor([1.0])), ref)
    # DiT: integer steps, no cast back to the input dtype
    dit = randomize(create_model("dit-tiny-64x32"))
    assert dit.t_embedder(torch.tensor([999])).dtype == torch.float32


# ------------------------------------------------------------------------------------------ forward


def reference_forward(sd: dict[str, torch.Tensor], depth: int, heads: int, x, t, y) -> torch.Tensor:
    """An explicit, module-free forward from the state dict (FORMATS 1.6 numerics)."""

    def lin(h, k):
        return h @ sd[k + ".weight"].T + sd[k + ".bias"]

    def ln(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    h = lin(x, "x_embedder") + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs
    temb = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), "t_embedder.mlp.0")),
               "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    B, N, D = h.shape
    hd = D // heads
    for i in range(depth):
        p = f"blocks.{i}."
        mod = lin(F.silu(c), p + "adaLN_modulation.1")
        sh1, sc1, g1, sh2, sc2, g2 = (mod[:, j * D:(j + 1) * D, None].transpose(1, 2) for j in range(6))
        a = ln(h) * (1 + sc1) + sh1
        qkv = lin(a, p + "attn.qkv").reshape(B, N, 3, heads, hd)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        att = torch.softmax((q * hd**-0.5) @ k.transpose(-1, -2), -1) @ v
        h = h + g1 * lin(att.transpose(1, 2).reshape(B, N, D), p + "attn.proj")
        m = ln(h) * (1 + sc2) + sh2
        h = h + g2 * lin(F.gelu(lin(m, p + "mlp.fc1"), approximate="tanh"), p + "mlp.fc2")
    mod = lin(F.silu(c), "final_layer.adaLN_modulation.1")
    shift, scale = mod[:, None, :D], mod[:, None, D:]
    return lin(ln(h) * (1 + scale) + shift, "final_layer.linear")


@pytest.mark.parametrize("name", ["sit-tiny-64x32", "dit-tiny-32x64"])
def test_forward_matches_explicit_reference(name: str) -> None:
    model = randomize(create_model(name), seed=1)
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, cfg.num_tokens, cfg.token_dim, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0]) if isinstance(model, SiT) else torch.tensor([0.0, 500.0, 999.0])
    y = torch.tensor([0, 207, cfg.null_class])
    with torch.no_grad():
        out = model(x, t, y)
        ref = reference_forward(model.state_dict(), cfg.depth, cfg.num_heads, x, t, y)
    assert isinstance(out, torch.Tensor) and out.shape == (3, cfg.num_tokens, cfg.out_channels)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_sdpa_matches_explicit_attention() -> None:
    model = randomize(create_model("sit-tiny-32x64"), seed=3, std=0.1)
    x = torch.randn(4, 32, 64)
    t, y = torch.rand(4), torch.tensor([1, 2, 3, 1000])
    with torch.no_grad():
        fused = model(x, t, y)
        model.set_fused_attention(False)
        explicit = model(x, t, y)
    assert fused.abs().max() > 0.1
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_fresh_model_outputs_zero_and_class_dropout_only_in_training() -> None:
    model = create_model("sit-tiny-64x32").eval()
    x, t, y = torch.randn(2, 64, 32), torch.rand(2), torch.tensor([5, 6])
    assert torch.equal(model(x, t, y), torch.zeros(2, 64, 32))  # adaLN-Zero init
    model = randomize(model)
    emb = model.y_embedder
    assert torch.equal(emb(y), emb.embedding_table.weight[y])
    forced = emb(y, force_drop=torch.tensor([True, False]))
    assert torch.equal(forced[0], emb.embedding_table.weight[1000]) and torch.equal(forced[1], emb(y)[1])
    emb.train()
    emb.dropout_prob = 1.0
    assert torch.equal(emb(y), emb.embedding_table.weight[[1000, 1000]])


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SiTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError):
        SiTConfig(sampler="ddpm")
    with pytest.raises(ValueError):
        DiTConfig(noise_schedule="quadratic")
    with pytest.raises(ValueError):
        SiTConfig(trained_classes=(1000,))


# ---------------------------------------------------------------------------------------- checkpoints


def test_save_load_roundtrip_is_bit_exact(tmp_path) -> None:
    model = randomize(create_model("sit-tiny-64x32", tokenizer="softvq-tiny-64", trained_classes=(1, 207)))
    save_pretrained(model, tmp_path / "sit")
    loaded = load_pretrained(tmp_path / "sit")
    assert isinstance(loaded, SiT) and loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t, y = torch.randn(2, 64, 32), torch.rand(2), torch.tensor([1, 207])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))


def _official_sit_config(**kw) -> dict:
    d = {"class_dropout_prob": 0.1, "decoder_hidden_size": 1152, "depth": 28, "hidden_size": 1152,
         "in_channels": 64, "input_size": 32, "mlp_ratio": 4.0, "num_classes": 1000, "num_heads": 16,
         "patch_size": 1, "path_type": "edm", "qk_norm": False, "use_cfg": True, "vae_1d": True,
         "tags": ["arxiv:2412.10958"], "license": "apache-2.0", "repo_url": "https://example.invalid"}
    d.update(kw)
    return d


def test_official_sit_config_translates() -> None:
    from models.official import config_from_official

    cls, cfg = config_from_official(_official_sit_config())
    assert cls is SiT
    xl = get_config("sit-xl_softvq-bl-32")
    for f in ("num_tokens", "token_dim", "hidden_size", "depth", "num_heads", "mlp_ratio", "num_classes",
              "learn_sigma", "class_dropout_prob", "sampler", "steps", "cfg_scale", "guidance_high", "path_type"):
        assert getattr(cfg, f) == getattr(xl, f), f
    cls, cfg = config_from_official({"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 1,
                                     "in_channels": 32, "input_size": 64, "learn_sigma": True,
                                     "class_dropout_prob": 0.1, "vae_1d": True})
    assert cls is DiT and cfg.learn_sigma and cfg.out_channels == 64
    with pytest.raises(ValueError, match="vae_1d"):
        SiTConfig.from_official(_official_sit_config(patch_size=2, vae_1d=False))


def _official_dit_config(**kw) -> dict:
    d = {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 1, "in_channels": 32, "input_size": 64,
         "learn_sigma": True, "class_dropout_prob": 0.1, "vae_1d": True}
    d.update(kw)
    return d


@pytest.mark.parametrize("family,bad,match", [
    ("sit", {"path_type": "vp"}, "path_type='vp'"),
    ("sit", {"use_cfg": False}, "use_cfg=false"),
    ("sit", {"decoder_hidden_size": 768}, "decoder_hidden_size=768"),
    ("sit", {"qk_norm": True}, "qk_norm=true"),
    ("sit", {"class_dropout_prob": 0.0}, "class_dropout_prob=0.0"),
    ("sit", {"fused_attn": True}, "fused_attn=True"),
    ("dit", {"learn_sigma": False}, "learn_sigma=false"),
    ("dit", {"patch_size": 2, "vae_1d": False}, "vae_1d"),
    ("dit", {"noise_schedule": "linear"}, "noise_schedule='linear'"),
])
def test_official_generator_config_refuses_unsupported(family: str, bad: dict, match: str) -> None:
    """Each refused field names itself, through the dispatcher: a DiT config with learn_sigma=false is refused
    as a DiT, never taken for a SiT."""
    from models.official import config_from_official

    d = _official_sit_config(**bad) if family == "sit" else _official_dit_config(**bad)
    with pytest.raises(ValueError, match=re.escape(match)):
        config_from_official(d)


def test_official_sit_path_type_is_honoured() -> None:
    from models.official import config_from_official

    for path in ("linear", "cosine"):
        cls, cfg = config_from_official(_official_sit_config(path_type=path))
        assert cls is SiT and cfg.path_type == path
    # "edm" (the published, unused constructor default) leaves the README recipe's path
    assert config_from_official(_official_sit_config())[1].path_type == "cosine"
    # a SiT config that states learn_sigma stays a SiT (it has SiT-only keys)
    cls, cfg = config_from_official(_official_sit_config(learn_sigma=True))
    assert cls is SiT and cfg.learn_sigma


def test_official_sit_folder_loads(tmp_path) -> None:
    src = randomize(create_model("sit-tiny-32x64"), seed=4)
    folder = tmp_path / "sit-xl_softvq-tiny"
    folder.mkdir()
    cfg = _official_sit_config(depth=2, hidden_size=64, decoder_hidden_size=64, num_heads=4)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(folder / "model.safetensors"))
    loaded = load_pretrained(folder)
    assert isinstance(loaded, SiT)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in src.state_dict().items())
    # a wrong shape is reported by key
    bad = dict(src.state_dict())
    bad["x_embedder.weight"] = torch.zeros(64, 32)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="x_embedder.weight"):
        load_pretrained(folder)


def test_models_package_registers_both_families() -> None:
    assert "SiT" in models.registry._CLASSES and "DiT" in models.registry._CLASSES
