"""Fine-tuning modes of XQ-GAN (FORMATS-MAR-XQV.md 2.5), for the encoder and the decoder separately:

* ``full``: every parameter trains;
* ``frozen``: the part's backbone gets ``requires_grad = False``;
* ``lora``: the backbone's matching ``Conv2d`` / ``Linear`` layers get LoRA adapters (:mod:`models.lora`,
  scale 1, as XQ-GAN's peft default alpha = rank), the base weights are frozen, the adapters train
  (and the backbone's norms too with ``train_norms``, like XQ-GAN's ``modules_to_save = norm``).

The "backbone" of a part is ``model.<part>.model`` when it exists (the ViT of the SC pipeline: as in XQ-GAN,
latent tokens, level embeddings, mask tokens, pixel heads stay trainable) and ``model.<part>`` otherwise
(the CNN of the V pipeline). ``quant_conv``, ``post_quant_conv`` and the codebooks always train.
For serving, :func:`merge_for_serving` folds the adapters into the base weights, so the saved folder has
exactly the base model's keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch.nn as nn
from pydantic import ConfigDict, Field

from models.lora import apply_lora, lora_layers, merge_lora
from training.config import ConfigModel

FinetuneMode = Literal["full", "lora", "frozen"]
FINETUNE_MODES: tuple[str, ...] = get_args(FinetuneMode)
PARTS: tuple[str, ...] = ("encoder", "decoder")
# LoRA targets: substrings of the layer names inside the backbone. The CNN's residual-block convs by default;
# add ".q", ".k", ".v", ".proj_out" for its attention, or "mlp.fc" for a ViT (XQ-GAN's choice).
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("conv1", "conv2")


class FinetuneConfig(ConfigModel):
    """One mode per part, and the LoRA settings shared by the parts in ``lora`` mode (the ``[finetune]`` table
    of an XQ-GAN config)."""

    model_config = ConfigDict(frozen=True)

    encoder: FinetuneMode = "full"
    decoder: FinetuneMode = "full"
    lora_rank: int = Field(8, ge=1)
    lora_targets: tuple[str, ...] = Field(DEFAULT_LORA_TARGETS, min_length=1)  # layer-name substrings
    train_norms: bool = False


@dataclass
class FinetuneReport:
    """What :func:`apply_finetune` did: LoRA-wrapped layer names and frozen parameter counts per part."""

    lora: dict[str, list[str]] = field(default_factory=dict)
    frozen: dict[str, int] = field(default_factory=dict)
    trainable: int = 0


def backbone(model: nn.Module, part: str) -> nn.Module:
    """The module that ``part``'s mode applies to: ``model.<part>.model`` if present, else
    ``model.<part>``."""
    if part not in PARTS:
        raise ValueError(f"part {part!r} not in {PARTS}")
    module = getattr(model, part, None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"{type(model).__name__} has no {part} module")
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) else module


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.GroupNorm | nn.LayerNorm | nn.BatchNorm2d)


def apply_finetune(model: nn.Module, cfg: FinetuneConfig) -> FinetuneReport:
    """Set up ``model`` in place for the modes of ``cfg``; build the optimizer afterwards from
    :func:`trainable_parameters`. Raises when a LoRA part has no layer matching the targets."""
    report = FinetuneReport()
    for part in PARTS:
        mode = getattr(cfg, part)
        body = backbone(model, part)
        if mode == "full":
            continue
        if mode == "lora":
            names = apply_lora(body, cfg.lora_targets, cfg.lora_rank)
            if not names:
                raise ValueError(
                    f"finetune.{part} = 'lora': no Conv2d / Linear under {part} matches {cfg.lora_targets}"
                )
            report.lora[part] = names
        body.requires_grad_(False)
        if mode == "lora":
            for layer in lora_layers(body).values():
                layer.lora_layer.requires_grad_(True)  # type: ignore[union-attr]
            if cfg.train_norms:
                for m in body.modules():
                    if _is_norm(m):
                        m.requires_grad_(True)
        report.frozen[part] = sum(p.numel() for p in body.parameters() if not p.requires_grad)
    report.trainable = sum(p.numel() for p in trainable_parameters(model))
    return report


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train after :func:`apply_finetune` (``requires_grad``), in module order."""
    return [p for p in model.parameters() if p.requires_grad]


def merge_for_serving(model: nn.Module) -> list[str]:
    """Fold every LoRA adapter into its base layer, in place (exact: ``W + up (x) down``); the state dict then
    has the base model's keys only. Returns the merged layer names."""
    return merge_lora(model)


def lora_state_dict(model: nn.Module) -> dict[str, object]:
    """Only the adapters' tensors (``*.lora_layer.*``), e.g. to ship an adapter apart from its base."""
    return {k: v for k, v in model.state_dict().items() if ".lora_layer." in k}


def describe(cfg: FinetuneConfig, parts: Sequence[str] = PARTS) -> str:
    """One line such as ``encoder lora (rank 8, conv1|conv2), decoder full``."""
    out = []
    for part in parts:
        mode = getattr(cfg, part)
        out.append(
            f"{part} {mode}"
            + (f" (rank {cfg.lora_rank}, {'|'.join(cfg.lora_targets)})" if mode == "lora" else "")
        )
    return ", ".join(out)


__all__ = [
    "DEFAULT_LORA_TARGETS",
    "FINETUNE_MODES",
    "FinetuneConfig",
    "FinetuneReport",
    "apply_finetune",
    "backbone",
    "describe",
    "lora_state_dict",
    "merge_for_serving",
    "trainable_parameters",
]
