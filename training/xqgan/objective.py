"""The XQ-GAN training objective, built from an :class:`~training.xqgan.config.XQGANTrainConfig`.

Generator side, on a batch x (B, 3, H, W) in [-1, 1] (FORMATS-MAR-XQV.md 2.3):

    out = model(x); x_hat = out.reconstruction (unclamped); tokens = out.quantized
    nll  = recon_weight * rec(x, x_hat) + lpips_weight * LPIPS(x, x_hat)
    loss = nll + quantizer_weight * sum(out.quantizer.losses)            (codebook, commitment, entropy)
         + align_weight * CLIP(group tokens, frozen-encoder features)     (alignment.kind = contrastive)
         + [step >= start] weight * lambda * G_adv(D(x_hat))              (lambda: adaptive gradient ratio)

Discriminator side: ``D_loss(D(x), D(x_hat.detach()))`` (+ ``lecam * LeCAM``), zero-weighted before ``start``
(the discriminator is not stepped then). The model's ``forward(x)`` must return ``.reconstruction``
(unclamped), ``.quantized`` (the straight-through quantized map (B, d, h, w) or tokens (B, L, d)) and
``.quantizer`` (a ``QuantizerOutput``): both pipelines (``XQGANCNN``, ``ImageFolderModel``) do.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from training.losses import reconstruction_loss
from training.xqgan.config import XQGANTrainConfig, token_groups
from training.xqgan.discriminators import build_discriminator, diff_augment
from training.xqgan.losses import ContrastiveAlignment, LeCAM, adversarial_weight, d_loss, g_loss

FEATURE_DIM = 1280  # EfficientNet-Lite0's head width


def _f(t: Tensor) -> float:
    return float(t.detach())


def last_layer(model: nn.Module) -> Tensor:
    """The decoder's last weight: ``model.last_layer``, else the last >= 2-d ``decoder`` parameter."""
    w = getattr(model, "last_layer", None)
    if isinstance(w, Tensor):
        return w
    cands = [p for n, p in model.named_parameters() if n.startswith("decoder") and p.dim() >= 2]
    if not cands:
        raise ValueError(f"{type(model).__name__}: no decoder weight for the adaptive GAN weight")
    return cands[-1]


class XQGANObjective(nn.Module):
    """The menu's extra modules and the two losses.

    Modules: ``disc`` (or None), ``lecam`` (or None), ``aligner`` (a :class:`ContrastiveAlignment`, trained
    with the model) and the frozen ``align_encoder`` / ``lpips`` networks (not parameters of this module;
    pass them in to share or to stub them in tests). ``model_parameters()`` are the objective's parameters
    that train with the tokenizer; ``disc_parameters()`` those of the discriminator optimizer.
    """

    def __init__(
        self,
        cfg: XQGANTrainConfig,
        model: nn.Module,
        *,
        lpips: nn.Module | None = None,
        align_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        dc, ac, lc = cfg.discriminator, cfg.alignment, cfg.loss
        size = int(model.config.image_size)
        self.disc = (
            build_discriminator(
                dc.kind, size, ndf=dc.ndf, n_layers=dc.layers, norm=dc.norm, resolution=dc.resolution
            )
            if dc.kind != "none"
            else None
        )
        self.lecam = LeCAM() if self.disc is not None and dc.lecam > 0 else None
        self.aligner = None
        self._frozen: dict[str, nn.Module] = {}
        if ac.kind == "contrastive" and ac.weight > 0:
            dim, groups = token_groups(model.config)
            self.aligner = ContrastiveAlignment(
                dim,
                FEATURE_DIM,
                num_groups=groups,
                group=ac.group,
                temperature=ac.temperature,
                normalize=ac.normalize,
            )
            if align_encoder is None:
                from training.perceptual import EfficientNetLite0

                align_encoder = EfficientNetLite0(resolution=ac.resolution)
            self._frozen["align_encoder"] = align_encoder.requires_grad_(False).eval()
        if lc.lpips_weight > 0:
            if lpips is None:
                from training.perceptual import LPIPS

                lpips = LPIPS()
            self._frozen["lpips"] = lpips.requires_grad_(False).eval()
        self._last = (last_layer(model),)  # a tuple: not registered as a parameter of the objective

    def _apply(self, fn, recurse: bool = True):  # move the frozen networks with the objective
        for m in self._frozen.values():
            m._apply(fn)
        return super()._apply(fn, recurse)

    def model_parameters(self) -> list[nn.Parameter]:
        return list(self.aligner.parameters()) if self.aligner is not None else []

    def disc_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.disc.parameters() if p.requires_grad] if self.disc is not None else []

    def gan_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg.discriminator.start

    def _disc_input(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        dc = self.cfg.discriminator
        return diff_augment(images, generator) if dc.augment and dc.kind == "dino" else images

    def generator_loss(
        self, model: nn.Module, x: Tensor, step: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """(loss, reconstruction x_hat (B, 3, H, W), metrics) for the tokenizer's optimizer."""
        lc, out = self.cfg.loss, {}
        fwd = model(x)
        x_hat = fwd.reconstruction
        rec = reconstruction_loss(x, x_hat.float(), lc.recon)
        nll = lc.recon_weight * rec
        out["rec"] = _f(rec)
        if "lpips" in self._frozen:
            n = lc.lpips_max_images or x.shape[0]
            p = self._frozen["lpips"](x[:n], x_hat[:n].float()).mean()
            nll = nll + lc.lpips_weight * p
            out["lpips"] = _f(p)
        q = fwd.quantizer.loss
        loss = nll + lc.quantizer_weight * q
        out["quantizer"] = _f(q)
        if self.aligner is not None:
            with torch.no_grad():
                feats = self._frozen["align_encoder"].features(x)
            a = self.aligner(fwd.quantized, feats)
            loss = loss + self.cfg.alignment.weight * a
            out["align"] = _f(a)
        if self.gan_active(step):
            dc = self.cfg.discriminator
            g = g_loss(dc.loss, self.disc(self._disc_input(x_hat, generator)))
            # A frozen last layer (frozen CNN decoder) has no gradient to compare: the fixed weight is used.
            last = self._last[0]
            adaptive = dc.adaptive and last.requires_grad
            w = adversarial_weight(
                nll, g, last, step=step, start=dc.start, disc_weight=dc.weight, adaptive=adaptive
            )
            loss = loss + w * g
            out["g_adv"], out["adv_weight"] = _f(g), _f(w)
        out["loss"] = _f(loss)
        return loss, x_hat, out

    def discriminator_loss(
        self, x: Tensor, x_hat: Tensor, step: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """(loss, metrics) for the discriminator's optimizer; call only when :meth:`gan_active`."""
        dc = self.cfg.discriminator
        real = self.disc(self._disc_input(x, generator))
        fake = self.disc(self._disc_input(x_hat.detach(), generator))
        loss = d_loss(dc.loss, real, fake)
        out = {"d_loss": _f(loss), "logits_real": _f(real.mean()), "logits_fake": _f(fake.mean())}
        if self.lecam is not None:
            reg = self.lecam(real, fake)
            loss = loss + dc.lecam * reg
            out["lecam"] = _f(reg)
        return loss, out


__all__ = ["FEATURE_DIM", "XQGANObjective", "last_layer"]
