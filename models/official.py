"""Recognise a published ``config.json`` (no ``class_name``) and translate it into one of our configs.

Each family's config class provides ``matches_official(d) -> bool`` and ``from_official(d) -> config``;
this module dispatches, and holds the one table of the published fields (:data:`OFFICIAL_FIELDS`): every
field of a published SoftVQ / SiT / DiT ``config.json`` is either honoured (translated into our config, or
checked against the values we support, with a ``ValueError`` naming the field and value otherwise) or ignored
for the reason written beside it. A field in neither column is refused, so a newer release with a new switch
fails loudly instead of loading into different numbers.

MAR has no published ``config.json`` (FORMATS-MAR-XQV.md 1.8: no MAR + SoftVQ release; the KL-16 MAR is
built from our registry), so a MAR-shaped dict is not recognised and fails with "config.json not recognised".
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from models.registry import model_class

HONOURED = "honoured"

_HUB = "Hugging Face hub metadata (model card), not the architecture"
_TRAIN_LOSS = "training-only loss weight"
_REPA = "training-only REPA alignment (its modules are not in the released weights, FORMATS.md 1.2)"

# family -> field -> HONOURED or the reason it is ignored. Fields not listed are refused.
OFFICIAL_FIELDS: dict[str, dict[str, str]] = {
    "softvq": {
        # architecture: translated (SoftVQConfig.from_official), or checked against the one supported value
        "image_size": HONOURED, "num_latent_tokens": HONOURED, "codebook_embed_dim": HONOURED,
        "codebook_size": HONOURED, "num_codebooks": HONOURED, "tau": HONOURED, "codebook_l2_norm": HONOURED,
        "encoder_model": HONOURED, "decoder_model": HONOURED, "enc_type": HONOURED, "dec_type": HONOURED,
        "enc_patch_size": HONOURED, "dec_patch_size": HONOURED, "use_ape": HONOURED, "use_rope": HONOURED,
        "to_pixel": HONOURED, "dec_cls_token": HONOURED, "enc_tuning_method": HONOURED,
        "dec_tuning_method": HONOURED, "vq_mean": HONOURED, "vq_std": HONOURED,
        # training-only
        "base_image_size": "training-only: the resolution of the first training stage",
        "codebook_show_usage": "training statistic (the quantize.codebook_used buffer is ignored at load)",
        "commit_loss_beta": _TRAIN_LOSS, "entropy_loss_ratio": _TRAIN_LOSS, "vq_loss_ratio": _TRAIN_LOSS,
        "kl_loss_weight": _TRAIN_LOSS,
        "enc_pretrained": "training-only: DINOv2 initialisation, overwritten by the released weights",
        "dec_pretrained": "training-only: initialisation, overwritten by the released weights",
        "enc_drop_path_rate": "training-only: stochastic depth is the identity at inference",
        "dec_drop_path_rate": "training-only: stochastic depth is the identity at inference",
        "repa": _REPA, "repa_patch_size": _REPA, "repa_model": _REPA, "repa_proj_dim": _REPA,
        "repa_loss_weight": _REPA, "repa_align": _REPA, "repa_layer_indices": _REPA,
        "tags": _HUB, "license": _HUB, "repo_url": _HUB,
    },
    "sit": {
        "input_size": HONOURED, "in_channels": HONOURED, "hidden_size": HONOURED, "depth": HONOURED,
        "num_heads": HONOURED, "mlp_ratio": HONOURED, "num_classes": HONOURED, "class_dropout_prob": HONOURED,
        "patch_size": HONOURED, "vae_1d": HONOURED, "qk_norm": HONOURED, "decoder_hidden_size": HONOURED,
        "use_cfg": HONOURED, "learn_sigma": HONOURED,
        # path_type: 'linear' / 'cosine' become the sampling default path; the published 'edm' is an unused
        # constructor default of the official SiT (FORMATS.md 1.3), so the README recipe's path is used
        "path_type": HONOURED,
        "encoder_depth": "training-only REPA projector tap (projectors.* weights are not used for sampling)",
        "z_dims": "training-only REPA projector sizes", "projector_dim": "training-only REPA projector width",
        "tags": _HUB, "license": _HUB, "repo_url": _HUB,
    },
    "dit": {
        "input_size": HONOURED, "in_channels": HONOURED, "hidden_size": HONOURED, "depth": HONOURED,
        "num_heads": HONOURED, "mlp_ratio": HONOURED, "num_classes": HONOURED, "class_dropout_prob": HONOURED,
        "patch_size": HONOURED, "vae_1d": HONOURED, "learn_sigma": HONOURED,
        "tags": _HUB, "license": _HUB, "repo_url": _HUB,
    },
}


def check_official_fields(family: str, d: dict[str, Any]) -> None:
    """Refuse a field of a published ``config.json`` that :data:`OFFICIAL_FIELDS` neither honours nor ignores."""
    known = OFFICIAL_FIELDS[family]
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        shown = ", ".join(f"{k}={d[k]!r}" for k in unknown)
        raise ValueError(f"official {family} config: unsupported field(s) {shown}; this loader honours or "
                         f"ignores only {sorted(known)} (models/official.py OFFICIAL_FIELDS)")


def ignored_official_fields(family: str, d: dict[str, Any]) -> dict[str, str]:
    """The fields of ``d`` that are ignored, with the reason each is (for logs and model notes)."""
    return {k: OFFICIAL_FIELDS[family][k] for k in d if OFFICIAL_FIELDS[family].get(k, HONOURED) != HONOURED}


# Checked in order; the first whose config class recognises the dict wins.
FAMILIES = ("SoftVQModel", "ImageFolderModel", "DiT", "SiT")


def config_from_official(d: dict[str, Any]) -> tuple[type[nn.Module], Any]:
    for name in FAMILIES:
        try:
            cls = model_class(name)
        except KeyError:
            continue
        cfg_cls = cls.config_class
        if hasattr(cfg_cls, "matches_official") and cfg_cls.matches_official(d):
            return cls, cfg_cls.from_official(d)
    raise ValueError(f"config.json not recognised (no class_name, keys {sorted(d)[:12]}...)")
