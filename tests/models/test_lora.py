"""LoRA adapters: the published key layout, exact identity at init, exact merging, name-based targeting."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models.lora import (
    LoRAConv2d,
    LoRALinear,
    apply_lora,
    lora_layers,
    lora_parameters,
    merge_lora,
    merged_layer,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.ReLU()),
        nn.Conv2d(8, 6, 1),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    )


def _randomize_up(module: nn.Module) -> None:
    with torch.no_grad():
        for layer in lora_layers(module).values():
            layer.lora_layer.up.weight.normal_(0, 0.5)


def test_conv_keys_shapes_and_shared_base_parameters() -> None:
    base = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    layer = LoRAConv2d.wrap(base, rank=4)
    assert isinstance(layer, nn.Conv2d) and layer.weight is base.weight and layer.bias is base.bias
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"weight": (16, 8, 3, 3), "bias": (16,), "lora_layer.down.weight": (4, 8, 3, 3),
                      "lora_layer.up.weight": (16, 4, 1, 1)}
    down = layer.lora_layer.down
    assert (down.stride, down.padding, down.dilation) == (base.stride, base.padding, base.dilation)
    assert down.bias is None and layer.lora_layer.up.bias is None
    assert torch.count_nonzero(layer.lora_layer.up.weight) == 0 and torch.count_nonzero(down.weight) > 0


@pytest.mark.parametrize("targets", [None, ("0", "1.0", "2", "4")])
def test_wrapped_network_starts_equal_to_the_base(targets: tuple[str, ...] | None) -> None:
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    names = apply_lora(net, targets, rank=2)
    assert names == ["0", "1.0", "2", "4"]
    assert torch.equal(net(x), ref)  # up is zero-initialised: exactly the base layer


def test_base_keys_keep_their_names_and_load_from_the_plain_model() -> None:
    plain = _net()
    net = _net()
    apply_lora(net, None, rank=3)
    sd = net.state_dict()
    lora_keys = {k for k in sd if ".lora_layer." in k}
    assert set(sd) - lora_keys == set(plain.state_dict())
    assert lora_keys == {f"{n}.lora_layer.{p}.weight" for n in ("0", "1.0", "2", "4") for p in ("down", "up")}
    assert sd["4.lora_layer.down.weight"].shape == (3, 96) and sd["4.lora_layer.up.weight"].shape == (5, 3)
    missing, unexpected = net.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == lora_keys and not unexpected


def test_targets_match_name_substrings_and_skip_adapters() -> None:
    net = _net()
    assert apply_lora(net, ("1.",), rank=2) == ["1.0"]
    assert isinstance(net[1][0], LoRAConv2d) and not isinstance(net[0], LoRAConv2d)
    assert apply_lora(net, ("1.",), rank=2) == []  # the wrapped conv and its own down / up are left alone
    assert apply_lora(net, None, rank=2, kinds=(nn.Linear,)) == ["4"]
    assert isinstance(net[4], LoRALinear)
    with pytest.raises(TypeError):
        apply_lora(net, "conv", rank=2)  # type: ignore[arg-type]


def test_merge_is_exact_for_conv_and_linear() -> None:
    net = _net().double()
    apply_lora(net, None, rank=3)
    _randomize_up(net)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        adapted = net(x)
        conv = net[1][0]
        expected = conv.weight + torch.einsum("or,rihw->oihw", conv.lora_layer.up.weight[:, :, 0, 0],
                                              conv.lora_layer.down.weight)
        merged_conv = merged_layer(conv)
        assert type(merged_conv) is nn.Conv2d and merged_conv.bias is None
        torch.testing.assert_close(merged_conv.weight, expected, rtol=0, atol=1e-14)
        lin = net[4]
        torch.testing.assert_close(merged_layer(lin).weight, lin.weight + lin.lora_layer.up.weight
                                   @ lin.lora_layer.down.weight, rtol=0, atol=1e-14)
        assert not torch.equal(adapted, _net().double()(x))  # the adapters do change the output
        assert merge_lora(net) == ["0", "1.0", "2", "4"]
        torch.testing.assert_close(net(x), adapted, rtol=0, atol=1e-12)
    assert not lora_layers(net) and not any("lora_layer" in k for k in net.state_dict())
    plain = _net().double()
    plain.load_state_dict(net.state_dict(), strict=True)  # merged = the plain layout


def test_lora_parameters_get_gradients_and_the_frozen_base_does_not() -> None:
    net = _net()
    net.requires_grad_(False)
    apply_lora(net, None, rank=2)
    params = lora_parameters(net)
    assert len(params) == 8 and all(p.requires_grad for p in params)
    assert {id(p) for p in net.parameters() if p.requires_grad} == {id(p) for p in params}
    net(torch.randn(2, 3, 8, 8)).square().sum().backward()
    ups = [m.lora_layer.up.weight for m in lora_layers(net).values()]
    assert all(u.grad is not None and u.grad.abs().sum() > 0 for u in ups)
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)
