"""The three XQ-GAN discriminators (FORMATS-MAR-XQV.md 2.3) and DiffAugment.

* :class:`PatchGANDiscriminator`: pix2pix NLayer, one logit per overlapping patch, (B, 1, h, w); the key
  layout of the published ``patchgan`` (``main.{0,2,3,5,6,8,9,11}``, BatchNorm).
* :class:`StyleGANDiscriminator`: a 3x3 conv, residual downsampling blocks with a [1, 2, 1] blur down to
  4x4, a 3x3 conv and two linear layers, one logit per image (B, 1); at 256 px the published ``stylegan``
  layout (36,500,225 parameters).
* :class:`FrozenFeatureDiscriminator`: the DINO discriminator's design on the frozen encoder available here
  (EfficientNet-Lite0, :class:`EfficientNetTaps`): features tapped at several depths, each (B, C, N)
  sequence judged per position by a small trainable head of spectral-normalised 1-D convs; (B, sum N).
  The backbone never trains; gradients still flow through it to the images.

All take images (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------- PatchGAN


class PatchGANDiscriminator(nn.Module):
    """pix2pix NLayer discriminator: 4x4 convs, ``n_layers`` of stride 2 then one of stride 1 (channels
    ``ndf * min(2^i, 8)``), LeakyReLU 0.2, BatchNorm (or GroupNorm with ``norm="group"``), a 1-channel head.

    ``forward(images (B, 3, H, W)) -> logits (B, 1, h, w)``; at 256 px with the defaults (B, 1, 30, 30), each
    logit seeing a 70x70 patch. Weights N(0, 0.02), norm scales N(1, 0.02).
    """

    def __init__(self, ndf: int = 64, n_layers: int = 3, in_channels: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm {norm!r}: use 'batch' or 'group'")

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "batch" else nn.GroupNorm(min(32, c // 4), c)

        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2**i, 8)
            layers += [
                nn.Conv2d(ch, out, 4, 2 if i < n_layers else 1, 1, bias=False),
                norm_layer(out),
                nn.LeakyReLU(0.2, True),
            ]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.main(images)


# ---------------------------------------------------------------------------------------------- StyleGAN


class Blur(nn.Module):
    """Depthwise [1, 2, 1] x [1, 2, 1] / 16 low-pass with reflect padding: (B, C, H, W) -> same shape."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("f", torch.tensor([1.0, 2.0, 1.0]))

    def forward(self, x: Tensor) -> Tensor:
        k = self.f[:, None] * self.f[None, :]
        k = (k / k.sum()).to(x.dtype).expand(x.shape[1], 1, 3, 3)
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=x.shape[1])


class StyleGANBlock(nn.Module):
    """(B, Ci, H, W) -> (B, Co, H/2, W/2): ``(conv_res(x) + down(net(x))) / sqrt(2)`` with ``conv_res`` a 1x1
    stride-2 conv, ``net`` [3x3, LReLU, 3x3, LReLU] and ``down`` [blur, 3x3 stride 2]."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv_res = nn.Conv2d(in_ch, out_ch, 1, stride=2)
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.LeakyReLU(0.2, True),
        )
        self.downsample = nn.Sequential(Blur(), nn.Conv2d(out_ch, out_ch, 3, padding=1, stride=2))

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv_res(x) + self.downsample(self.net(x))) * (1.0 / math.sqrt(2.0))


class StyleGANDiscriminator(nn.Module):
    """StyleGAN2-style residual discriminator without normalisation.

    ``forward(images (B, 3, S, S)) -> logits (B, 1)``. The width at resolution r is ``min(max_channels,
    base_channels * S / r)`` (at 256 px: 64 -> 128 -> 256 -> 512 -> 512 -> 512 -> 512); ``log2(S) - 2``
    blocks bring the map to 4x4.
    """

    def __init__(self, image_size: int = 256, base_channels: int = 64, max_channels: int = 512) -> None:
        super().__init__()
        log = int(round(math.log2(image_size)))
        if image_size < 8 or 2**log != image_size:
            raise ValueError(
                f"the StyleGAN discriminator needs a power-of-two image size >= 8, got {image_size}"
            )

        def width(r: int) -> int:
            return min(max_channels, base_channels * image_size // r)

        ch = width(image_size)
        blocks: list[nn.Module] = [nn.Conv2d(3, ch, 3, padding=1), nn.LeakyReLU(0.2, True)]
        for r in (2**i for i in range(log, 2, -1)):
            out = width(r // 2)
            blocks.append(StyleGANBlock(ch, out))
            ch = out
        self.blocks = nn.Sequential(*blocks)
        top = width(4)
        self.final_conv = nn.Sequential(nn.Conv2d(ch, top, 3, padding=1), nn.LeakyReLU(0.2, True))
        self.final_linear = nn.Sequential(
            nn.Linear(top * 16, top), nn.LeakyReLU(0.2, True), nn.Linear(top, 1)
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.final_linear(self.final_conv(self.blocks(images)).flatten(1))


# ------------------------------------------------------------------------------------------ frozen features


class EfficientNetTaps(nn.Module):
    """Frozen EfficientNet-Lite0 (``training.perceptual.EfficientNetLite0``) returning intermediate maps.

    ``forward(images (B, 3, H, W) in [-1, 1]) -> [ (B, C_t, h_t, w_t) for t in taps ]``; ``taps`` index the
    16 MBConv blocks (block outputs: 16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320
    channels; strides 2 .. 32), and ``"stem"`` the stem. Inputs are resized to ``resolution``.
    """

    BLOCK_CHANNELS = (16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320)

    def __init__(
        self,
        taps: Sequence[int | str] = (2, 4, 10, 15),
        resolution: int = 224,
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if encoder is None:
            from training.perceptual import EfficientNetLite0

            encoder = EfficientNetLite0(resolution=resolution)
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.taps = tuple(taps)
        bad = [t for t in self.taps if t != "stem" and not (isinstance(t, int) and 0 <= t < 16)]
        if bad or not self.taps:
            raise ValueError(f"taps must be 'stem' or block indices 0..15, got {self.taps}")
        self.channels = tuple(32 if t == "stem" else self.BLOCK_CHANNELS[t] for t in self.taps)

    def train(self, mode: bool = True) -> EfficientNetTaps:  # the backbone stays in eval mode
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        net = self.encoder.net
        x = net._swish(net._bn0(net._conv_stem(self.encoder._prep(images))))
        out = [x] if "stem" in self.taps else []
        last = max(t for t in self.taps if t != "stem") if any(t != "stem" for t in self.taps) else -1
        for i, block in enumerate(net._blocks[: last + 1]):
            x = block(x)
            if i in self.taps:
                out.append(x)
        return out


class BatchNormLocal(nn.Module):
    """BatchNorm over virtual batches of ``virtual_bs`` samples (statistics per group, no running stats):
    x (B, C, N) -> same."""

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        groups = math.ceil(b / self.virtual_bs)
        if b % groups:
            groups = 1
        g = x.reshape(groups, -1, *x.shape[1:])  # (G, B/G, C, N)
        mean = g.mean(dim=(1, 3), keepdim=True)
        var = g.var(dim=(1, 3), keepdim=True, unbiased=False)
        g = (g - mean) * torch.rsqrt(var + self.eps)
        return g.reshape(x.shape) * self.weight[None, :, None] + self.bias[None, :, None]


def _sn_conv1d(c_in: int, c_out: int, k: int) -> nn.Module:
    conv = nn.Conv1d(c_in, c_out, k, padding=k // 2, padding_mode="circular" if k > 1 else "zeros")
    return nn.utils.spectral_norm(conv)


class FeatureHead(nn.Module):
    """Per-position head on (B, C, N): [SN conv k1, BNLocal, LReLU], then a residual [SN conv k9 circular,
    BNLocal, LReLU] / sqrt 2, then SN conv k1 -> (B, 1, N)."""

    def __init__(self, channels: int, kernel: int = 9) -> None:
        super().__init__()
        self.main = nn.Sequential(
            _sn_conv1d(channels, channels, 1), BatchNormLocal(channels), nn.LeakyReLU(0.2)
        )
        self.residual = nn.Sequential(
            _sn_conv1d(channels, channels, kernel), BatchNormLocal(channels), nn.LeakyReLU(0.2)
        )
        self.cls = _sn_conv1d(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.main(x)
        h = (h + self.residual(h)) * (1.0 / math.sqrt(2.0))
        return self.cls(h)


class FrozenFeatureDiscriminator(nn.Module):
    """The DINO discriminator's design on a frozen backbone: ``forward(images) -> logits (B, sum_t N_t)``.

    ``backbone`` maps images to a list of maps (B, C_t, h_t, w_t) and has ``channels`` (default: frozen
    EfficientNet-Lite0 taps, :class:`EfficientNetTaps`). It is frozen and kept out of ``parameters()`` and
    ``state_dict()`` (the published DINO discriminator files hold the heads only); one trainable
    :class:`FeatureHead` per tap. DiffAugment is applied by the caller (:func:`diff_augment`).
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        *,
        resolution: int = 224,
        taps: Sequence[int | str] = (2, 4, 10, 15),
    ) -> None:
        super().__init__()
        backbone = backbone if backbone is not None else EfficientNetTaps(taps, resolution)
        backbone.requires_grad_(False)
        # Held outside the module tree: not in parameters(), state_dict() or train(); moved by _apply.
        self._backbone = (backbone,)
        self.heads = nn.ModuleList(FeatureHead(c) for c in backbone.channels)

    @property
    def backbone(self) -> nn.Module:
        return self._backbone[0]

    def _apply(self, fn, recurse: bool = True):  # .to(device) / .half() also move the frozen backbone
        self.backbone._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, images: Tensor) -> Tensor:
        maps = self.backbone(images)
        logits = [head(m.flatten(2)) for head, m in zip(self.heads, maps, strict=True)]
        return torch.cat([x.flatten(1) for x in logits], dim=1)


# ---------------------------------------------------------------------------------------------- DiffAugment


def diff_augment(
    x: Tensor,
    generator: torch.Generator | None = None,
    *,
    translation: float = 0.125,
    cutout: float = 0.2,
    color: bool = True,
) -> Tensor:
    """DiffAugment (Zhao et al. 2020): differentiable colour (brightness, saturation, contrast), translation
    by up to ``translation`` of the side (zero fill) and a ``cutout`` square, each drawn per sample.
    x (B, 3, H, W) in [-1, 1] -> same shape."""
    b, _, h, w = x.shape
    dev = x.device

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator).to(dev, x.dtype)

    if color:
        x = x + (rand(b, 1, 1, 1) - 0.5)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (rand(b, 1, 1, 1) * 2) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (rand(b, 1, 1, 1) + 0.5) + mean
    if translation > 0:
        sh, sw = int(h * translation + 0.5), int(w * translation + 0.5)
        dy = (torch.randint(-sh, sh + 1, (b,), generator=generator)).to(dev)
        dx = (torch.randint(-sw, sw + 1, (b,), generator=generator)).to(dev)
        ys = torch.arange(h, device=dev)[None, :] - dy[:, None]  # (B, H) source rows
        xs = torch.arange(w, device=dev)[None, :] - dx[:, None]
        valid = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]  # (B, H, W)
        idx = ys.clamp(0, h - 1)[:, :, None] * w + xs.clamp(0, w - 1)[:, None, :]
        x = x.flatten(2).gather(2, idx.flatten(1)[:, None, :].expand(-1, x.shape[1], -1)).view_as(x)
        x = x * valid[:, None].to(x.dtype)
    if cutout > 0:
        ch, cw = int(h * cutout + 0.5), int(w * cutout + 0.5)
        cy = torch.randint(0, h + (1 - ch % 2), (b,), generator=generator).to(dev)
        cx = torch.randint(0, w + (1 - cw % 2), (b,), generator=generator).to(dev)
        ys = torch.arange(h, device=dev)[None, :] - (cy[:, None] - ch // 2)
        xs = torch.arange(w, device=dev)[None, :] - (cx[:, None] - cw // 2)
        hole = ((ys >= 0) & (ys < ch))[:, :, None] & ((xs >= 0) & (xs < cw))[:, None, :]
        x = x * (~hole)[:, None].to(x.dtype)
    return x


DISCRIMINATORS: tuple[str, ...] = ("patchgan", "stylegan", "dino")


def build_discriminator(
    kind: str,
    image_size: int,
    *,
    ndf: int = 64,
    n_layers: int = 3,
    norm: str = "batch",
    resolution: int = 224,
    taps: Sequence[int | str] = (2, 4, 10, 15),
) -> nn.Module:
    """``patchgan`` | ``stylegan`` | ``dino`` (frozen EfficientNet-Lite0 features with DINO-style heads)."""
    if kind == "patchgan":
        return PatchGANDiscriminator(ndf, n_layers, norm=norm)
    if kind == "stylegan":
        return StyleGANDiscriminator(image_size, base_channels=ndf)
    if kind == "dino":
        return FrozenFeatureDiscriminator(resolution=resolution, taps=taps)
    raise ValueError(f"unknown discriminator {kind!r}; choose from {DISCRIMINATORS}")


__all__ = [
    "DISCRIMINATORS",
    "BatchNormLocal",
    "Blur",
    "EfficientNetTaps",
    "FeatureHead",
    "FrozenFeatureDiscriminator",
    "PatchGANDiscriminator",
    "StyleGANBlock",
    "StyleGANDiscriminator",
    "build_discriminator",
    "diff_augment",
]
