"""LoRA adapters for ``Conv2d`` and ``Linear`` layers, key-compatible with CODA's published VAE files.

A wrapped layer subclasses its base class (:class:`LoRAConv2d` is an ``nn.Conv2d``, :class:`LoRALinear` an
``nn.Linear``), so the base parameters keep their names (``<name>.weight``, ``<name>.bias``) and the adapter
adds two tensors under ``<name>.lora_layer`` (FORMATS.md 3.2-3.3, diffusers' ``LoRACompatibleConv``):

    conv:    down = Conv2d(Cin, r, k, stride, padding, dilation, bias=False)  weight (r, Cin, k, k)
             up   = Conv2d(r, Cout, 1, bias=False), zero-initialised            weight (Cout, r, 1, 1)
    linear:  down = Linear(in, r, bias=False)  (the usual A)                  weight (r, in)
             up   = Linear(r, out, bias=False) (the usual B), zero-initialised weight (out, r)

    output = base(x) + up(down(x))          # scale 1: no alpha / rank factor

``down`` starts as N(0, 1/r) and ``up`` at zero, so a freshly wrapped layer computes exactly its base layer.
Because ``up`` is pointwise, the adapter folds into the base weight exactly (:func:`merged_layer`):
``W' = W + up (x) down``, i.e. ``W'[o, i, ...] = W[o, i, ...] + sum_r up[o, r] * down[r, i, ...]``.

    >>> names = apply_lora(vae, targets=("conv1", "conv2"), rank=32)   # wrap in place, by name substring
    >>> opt = torch.optim.AdamW(lora_parameters(vae))
    >>> merge_lora(vae)                                                # fold in place for serving
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

LORA_PREFIX = "lora_layer"


class LoRAConvLayer(nn.Module):
    """The adapter of a conv: x (B, Cin, H, W) -> up(down(x)) (B, Cout, H', W'), same geometry as the base."""

    def __init__(self, base: nn.Conv2d, rank: int) -> None:
        super().__init__()
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
                              dilation=base.dilation, bias=False, padding_mode=base.padding_mode, **kw)
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **kw)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def delta_weight(self) -> torch.Tensor:
        """``up (x) down``: (Cout, Cin, k, k), the change of the base kernel."""
        return torch.einsum("or,rihw->oihw", self.up.weight[:, :, 0, 0], self.down.weight)


class LoRALinearLayer(nn.Module):
    """The adapter of a linear layer: x (..., in) -> B(A(x)) (..., out)."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.down = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.up = nn.Linear(rank, base.out_features, bias=False, **kw)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def delta_weight(self) -> torch.Tensor:
        """``up @ down``: (out, in)."""
        return self.up.weight @ self.down.weight


class LoRAConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` with an optional additive adapter ``lora_layer`` (:class:`LoRAConvLayer`)."""

    lora_layer: LoRAConvLayer | None

    @classmethod
    def wrap(cls, base: nn.Conv2d, rank: int) -> LoRAConv2d:
        """A LoRA conv sharing ``base``'s weight and bias parameters (not copies)."""
        if base.groups != 1:
            raise ValueError("LoRA on grouped convolutions is not supported")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        with torch.device("meta"):  # the base parameters are replaced below: build them nowhere
            layer = cls(base.in_channels, base.out_channels, base.kernel_size, stride=base.stride,
                        padding=base.padding, dilation=base.dilation, bias=base.bias is not None,
                        padding_mode=base.padding_mode)
        layer.weight = base.weight
        layer.bias = base.bias
        layer.lora_layer = LoRAConvLayer(base, rank)
        layer.train(base.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, H, W) -> (B, Cout, H', W'): ``base(x) + up(down(x))``."""
        out = self._conv_forward(x, self.weight, self.bias)
        return out if self.lora_layer is None else out + self.lora_layer(x)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with an optional additive adapter ``lora_layer`` (:class:`LoRALinearLayer`)."""

    lora_layer: LoRALinearLayer | None

    @classmethod
    def wrap(cls, base: nn.Linear, rank: int) -> LoRALinear:
        """A LoRA linear layer sharing ``base``'s weight and bias parameters (not copies)."""
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        with torch.device("meta"):
            layer = cls(base.in_features, base.out_features, bias=base.bias is not None)
        layer.weight = base.weight
        layer.bias = base.bias
        layer.lora_layer = LoRALinearLayer(base, rank)
        layer.train(base.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out): ``base(x) + B(A(x))``."""
        out = nn.functional.linear(x, self.weight, self.bias)
        return out if self.lora_layer is None else out + self.lora_layer(x)


LORA_TYPES = (LoRAConv2d, LoRALinear)


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def apply_lora(module: nn.Module, targets: Sequence[str] | None, rank: int,
               kinds: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)) -> list[str]:
    """Wrap, in place, every layer of ``kinds`` under ``module`` whose qualified name (relative to
    ``module``) contains any of ``targets`` (``None``: every such layer). Layers that already carry an
    adapter, and the adapters' own layers, are left alone. Returns the wrapped names, in module order."""
    if targets is not None and isinstance(targets, str):
        raise TypeError("targets is a sequence of substrings, not one string")
    chosen: list[tuple[str, nn.Module]] = []
    for name, m in module.named_modules():
        if not name or isinstance(m, LORA_TYPES) or f"{LORA_PREFIX}." in f"{name}.":
            continue
        if not isinstance(m, kinds) or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if targets is None or any(t in name for t in targets):
            chosen.append((name, m))
    for name, m in chosen:
        wrapped = LoRAConv2d.wrap(m, rank) if isinstance(m, nn.Conv2d) else LoRALinear.wrap(m, rank)
        _set_child(module, name, wrapped)
    return [name for name, _ in chosen]


def lora_layers(module: nn.Module) -> dict[str, LoRAConv2d | LoRALinear]:
    """Name -> wrapped layer (with an adapter) under ``module``."""
    return {n: m for n, m in module.named_modules() if isinstance(m, LORA_TYPES) and m.lora_layer is not None}


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (``down`` and ``up`` of every wrapped layer), e.g. for an optimizer."""
    return [p for m in lora_layers(module).values() for p in m.lora_layer.parameters()]  # type: ignore[union-attr]


@torch.no_grad()
def merged_layer(layer: LoRAConv2d | LoRALinear) -> nn.Conv2d | nn.Linear:
    """A plain ``nn.Conv2d`` / ``nn.Linear`` with the adapter folded in: ``W + up (x) down`` (same bias)."""
    if isinstance(layer, LoRAConv2d):
        out: nn.Conv2d | nn.Linear = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, bias=layer.bias is not None, padding_mode=layer.padding_mode,
            device=layer.weight.device, dtype=layer.weight.dtype)
    else:
        out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        device=layer.weight.device, dtype=layer.weight.dtype)
    weight = layer.weight.detach().clone()
    if layer.lora_layer is not None:
        weight += layer.lora_layer.delta_weight().to(weight.dtype)
    out.weight.copy_(weight)
    if layer.bias is not None:
        out.bias.copy_(layer.bias)
    out.weight.requires_grad_(layer.weight.requires_grad)
    if out.bias is not None:
        out.bias.requires_grad_(layer.bias.requires_grad)
    return out.train(layer.training)


def merge_lora(module: nn.Module) -> list[str]:
    """Replace, in place, every LoRA layer under ``module`` by its :func:`merged_layer`; the state dict then
    has the base layout only (no ``lora_layer`` keys). Returns the merged names."""
    names = [n for n, m in module.named_modules() if n and isinstance(m, LORA_TYPES)]
    for name in names:
        _set_child(module, name, merged_layer(module.get_submodule(name)))  # type: ignore[arg-type]
    return names


__all__ = [
    "LORA_PREFIX",
    "LoRAConv2d",
    "LoRAConvLayer",
    "LoRALinear",
    "LoRALinearLayer",
    "apply_lora",
    "lora_layers",
    "lora_parameters",
    "merge_lora",
    "merged_layer",
]
