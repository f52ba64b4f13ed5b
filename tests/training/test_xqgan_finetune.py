"""Fine-tuning modes on the V-pipeline tokenizer: LoRA starts equal to the base model and merges exactly into
the base key layout; frozen parts receive no gradient while the rest trains."""

from __future__ import annotations

import pytest
import torch

from models.xqgan_cnn import XQGANCNN, XQGANCNNConfig
from training.xqgan.finetune import (
    FinetuneConfig,
    apply_finetune,
    backbone,
    lora_state_dict,
    merge_for_serving,
    trainable_parameters,
)

CFG = XQGANCNNConfig(
    image_size=16,
    base_channels=16,
    channel_mult=(1, 2),
    enc_res_blocks=1,
    dec_res_blocks=1,
    z_channels=16,
    norm_groups=8,
    quantizer="lfq",
    codebook_size=0,
    codebook_dim=8,
    num_groups=2,
    num_levels=2,
)


def model() -> XQGANCNN:
    torch.manual_seed(0)
    return XQGANCNN(CFG).eval()


def images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _grads(m: torch.nn.Module, prefix: str) -> list[torch.Tensor | None]:
    return [p.grad for n, p in m.named_parameters() if n.startswith(prefix)]


def test_lora_starts_equal_and_merges_exactly() -> None:
    base = model()
    x = images()
    with torch.no_grad():
        ref_codes, ref_rec = base.encode(x), base(x).reconstruction
    base_keys = set(base.state_dict())
    m = model()
    report = apply_finetune(
        m,
        FinetuneConfig(
            encoder="lora",
            decoder="lora",
            lora_rank=4,
            lora_targets=("conv1", "conv2", ".q", ".k", ".v", "proj_out"),
        ),
    )
    assert report.lora["encoder"] and report.lora["decoder"]
    assert any(".attn.0.q" in n or "mid.1.q" in n for n in report.lora["decoder"])
    with torch.no_grad():  # a fresh adapter computes exactly the base layer
        assert torch.equal(m.encode(x), ref_codes)
        assert torch.equal(m(x).reconstruction, ref_rec)
    # only adapters (plus the quantizer side: quant convs) train
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(
        ".lora_layer." in n or n.startswith(("quant_conv", "post_quant_conv")) for n in names
    )
    assert lora_state_dict(m) and all(".lora_layer." in k for k in lora_state_dict(m))
    # train the adapters a little, then merge: same outputs, base keys only
    with torch.no_grad():
        for p in trainable_parameters(m):
            p.add_(torch.randn_like(p) * 0.05)
        before = m(x).reconstruction
        assert not torch.allclose(before, ref_rec)
    merged = merge_for_serving(m)
    assert merged and set(m.state_dict()) == base_keys
    with torch.no_grad():
        torch.testing.assert_close(m(x).reconstruction, before, atol=1e-5, rtol=1e-5)
    assert isinstance(m.encoder.conv_blocks[0].res[0].conv1, torch.nn.Conv2d)
    assert not hasattr(m.encoder.conv_blocks[0].res[0].conv1, "lora_layer")


def test_lora_unknown_targets_raise() -> None:
    with pytest.raises(ValueError, match="no Conv2d / Linear under encoder"):
        apply_finetune(model(), FinetuneConfig(encoder="lora", lora_targets=("mlp.fc1",)))


@pytest.mark.parametrize("frozen, trained", [("encoder", "decoder"), ("decoder", "encoder")])
def test_frozen_part_receives_no_gradient(frozen: str, trained: str) -> None:
    m = model().train()
    report = apply_finetune(m, FinetuneConfig(**{frozen: "frozen"}))
    assert report.frozen[frozen] == sum(p.numel() for p in getattr(m, frozen).parameters())
    x = images()
    out = m(x)
    ((out.reconstruction - x).pow(2).mean() + out.quantizer.loss).backward()
    assert all(g is None for g in _grads(m, frozen + "."))
    assert all(g is not None for g in _grads(m, trained + "."))
    assert all(g is not None for g in _grads(m, "quant_conv.") + _grads(m, "post_quant_conv."))
    assert {id(p) for p in trainable_parameters(m)}.isdisjoint(
        {id(p) for p in getattr(m, frozen).parameters()}
    )


def test_lora_with_frozen_decoder_trains_only_encoder_adapters() -> None:
    m = model().train()
    apply_finetune(m, FinetuneConfig(encoder="lora", decoder="frozen", lora_rank=2, train_norms=True))
    x = images()
    out = m(x)
    (out.reconstruction - x).pow(2).mean().backward()
    enc = {n: p for n, p in m.encoder.named_parameters()}
    assert all(p.grad is not None for n, p in enc.items() if ".lora_layer." in n)
    assert all(
        p.grad is None for n, p in enc.items() if n.endswith("conv1.weight") or n.endswith("conv2.weight")
    )
    assert all(p.grad is not None for n, p in enc.items() if "norm" in n)  # train_norms
    assert all(g is None for g in _grads(m, "decoder."))


def test_backbone_of_a_vit_part_is_its_model() -> None:
    class Part(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Linear(4, 4))
            self.latent_tokens = torch.nn.Parameter(torch.zeros(1, 2, 4))

    class Tok(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = Part(), Part()

    tok = Tok()
    assert backbone(tok, "encoder") is tok.encoder.model
    apply_finetune(tok, FinetuneConfig(encoder="frozen"))
    assert not tok.encoder.model[0].weight.requires_grad
    assert tok.encoder.latent_tokens.requires_grad  # as XQ-GAN: only the backbone freezes
    assert backbone(model(), "decoder") is not None
