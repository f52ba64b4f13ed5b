"""The exportable parts of a model: small ``nn.Module`` wrappers with plain tensor inputs and one tensor output.

A tokenizer yields ``encoder`` (images -> tokens, quantizer included) and ``decoder`` (tokens -> images); a
generator yields ``denoiser`` (one model evaluation ``x, t, y -> out``) and, optionally, ``denoiser_cfg`` (one
classifier-free-guided evaluation ``x, t, y, cfg_scale -> out``: conditional and unconditional rows in one
forward). Every part declares its inputs and outputs as :class:`TensorSpec` records, with ``"B"`` marking the
dynamic batch axis; exporters, parity checks and runtimes all read those specs.

Shapes and dtypes (B is the batch):

* encoder:     images (B, 3, H, W) float32 in [-1, 1]      -> tokens (B, L, D) float32 (raw, not normalised)
* decoder:     tokens (B, L, D) float32                     -> images (B, 3, H, W) float32, not clamped
* denoiser:    x (B, L, C) float32, t (B,) float32, y (B,) int64 -> out (B, L, C_out) float32
* denoiser_cfg: as denoiser plus cfg_scale (B,) float32     -> out (B, L, C_out) float32
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

TOKENIZER_PARTS = ("encoder", "decoder")
GENERATOR_PARTS = ("denoiser", "denoiser_cfg")
ALL_PARTS = TOKENIZER_PARTS + GENERATOR_PARTS
DEFAULT_PARTS = {"tokenizer": TOKENIZER_PARTS, "generator": ("denoiser",)}

Kind = Literal["tokenizer", "generator"]


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, shape (``"B"`` for the dynamic batch axis) and dtype name."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # "float32" or "int64"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "int64": torch.int64}[self.dtype]


@dataclass(frozen=True)
class PartSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PartSpec:
        return cls(d["name"], tuple(TensorSpec.from_dict(s) for s in d["inputs"]),
                   tuple(TensorSpec.from_dict(s) for s in d["outputs"]))


# ---------------------------------------------------------------------------------------------- model facts


def model_kind(model: nn.Module) -> Kind:
    """``tokenizer`` for models with ``encode`` and ``decode``, else ``generator``."""
    if callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None)):
        return "tokenizer"
    return "generator"


def _first_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output: the tensor itself, the first field of a tuple, or a named field."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("tokens", "quantized", "sample", "images", "out"):
        val = getattr(out, attr, None)
        if isinstance(val, torch.Tensor):
            return val
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


def _size2(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def tokenizer_facts(model: nn.Module) -> dict[str, Any]:
    """image_size (H, W), token_shape (L, D), vq_mean, vq_std of a tokenizer (read from the model/config)."""
    cfg = getattr(model, "config", None)
    image_size = getattr(model, "image_size", None) or getattr(cfg, "image_size", None)
    token_shape = getattr(model, "token_shape", None)
    if token_shape is None and hasattr(cfg, "num_tokens") and hasattr(cfg, "token_dim"):
        token_shape = (cfg.num_tokens, cfg.token_dim)  # e.g. TAEF2, KL-16: the shape lives on the config
    if image_size is None or token_shape is None:
        raise AttributeError(f"{type(model).__name__} must expose image_size and token_shape")
    return {
        "image_size": list(_size2(image_size)),
        "token_shape": [int(s) for s in token_shape],
        "vq_mean": float(getattr(cfg, "vq_mean", 0.0)),
        "vq_std": float(getattr(cfg, "vq_std", 1.0)),
    }


def generator_facts(model: nn.Module) -> dict[str, Any]:
    """latent_shape (L, C), out_channels, num_classes, null_class and time_scale of a generator.

    ``time_scale`` is the upper end of the model's timestep input (1.0 for SiT's t in [0, 1], 1000 for DiT's
    diffusion step in [0, 1000)); used to draw realistic random timesteps.
    """
    cfg = getattr(model, "config", None)
    length = getattr(cfg, "num_tokens", None) or getattr(cfg, "input_size", None)
    chans = getattr(cfg, "token_dim", None) or getattr(cfg, "in_channels", None)
    if length is None or chans is None:
        raise AttributeError(f"{type(model).__name__}: cannot tell its latent shape (L, C) from its config")
    num_classes = int(getattr(cfg, "num_classes", 1000))
    out_channels = getattr(cfg, "out_channels", None) or chans * (2 if getattr(cfg, "learn_sigma", False) else 1)
    null_class = getattr(cfg, "null_class", num_classes)
    family = str(getattr(cfg, "family", "") or type(model).__name__).lower()
    time_scale = float(getattr(cfg, "num_train_timesteps", 0) or (1000.0 if family == "dit" else 1.0))
    return {"latent_shape": [int(length), int(chans)], "out_channels": int(out_channels),
            "num_classes": num_classes, "null_class": int(null_class), "time_scale": time_scale}


# ---------------------------------------------------------------------------------------------- wrappers


class EncoderPart(nn.Module):
    """images (B, 3, H, W) float32 in [-1, 1] -> tokens (B, L, D) float32."""

    def __init__(self, tokenizer: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _first_tensor(self.tokenizer.encode(images))


class DecoderPart(nn.Module):
    """tokens (B, L, D) float32 -> images (B, 3, H, W) float32 (not clamped)."""

    def __init__(self, tokenizer: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return _first_tensor(self.tokenizer.decode(tokens))


class DenoiserPart(nn.Module):
    """x (B, L, C) float32, t (B,) float32, y (B,) int64 -> out (B, L, C_out) float32."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _first_tensor(self.generator(x, t, y))


class GuidedDenoiserPart(nn.Module):
    """One classifier-free-guided evaluation: x (B, L, C), t (B,), y (B,) int64, cfg_scale (B,) -> (B, L, C_out).

    Runs the conditional rows and their unconditional copies (class ``null_class``) in one forward of batch 2B,
    and returns ``u + s * (c - u)`` on the first ``guided_channels`` output channels (the velocity, or DiT's
    eps half) with the conditional values for the rest (DiT's learned variance).
    """

    def __init__(self, generator: nn.Module, null_class: int, guided_channels: int) -> None:
        super().__init__()
        self.generator = generator
        self.null_class = int(null_class)
        self.guided_channels = int(guided_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: torch.Tensor) -> torch.Tensor:
        out = _first_tensor(self.generator(torch.cat([x, x]), torch.cat([t, t]),
                                           torch.cat([y, torch.full_like(y, self.null_class)])))
        n = x.shape[0]
        cond, uncond = out[:n], out[n:]  # not chunk(2): torch.export would specialise the batch size
        g = self.guided_channels
        s = cfg_scale.to(out.dtype).view(-1, 1, 1)
        guided = uncond[..., :g] + s * (cond[..., :g] - uncond[..., :g])
        return torch.cat([guided, cond[..., g:]], dim=-1)


def build_part(model: nn.Module, part: str) -> tuple[nn.Module, PartSpec]:
    """The wrapper module of ``part`` and its spec. Raises ``ValueError`` if the model has no such part."""
    kind = model_kind(model)
    if kind == "tokenizer":
        facts = tokenizer_facts(model)
        (h, w), (length, dim) = facts["image_size"], facts["token_shape"]
        images = TensorSpec("images", ("B", 3, h, w), "float32")
        tokens = TensorSpec("tokens", ("B", length, dim), "float32")
        if part == "encoder":
            return EncoderPart(model).eval(), PartSpec(part, (images,), (tokens,))
        if part == "decoder":
            return DecoderPart(model).eval(), PartSpec(part, (tokens,), (images,))
    else:
        facts = generator_facts(model)
        length, chans = facts["latent_shape"]
        inputs = (TensorSpec("x", ("B", length, chans), "float32"), TensorSpec("t", ("B",), "float32"),
                  TensorSpec("y", ("B",), "int64"))
        out = (TensorSpec("out", ("B", length, facts["out_channels"]), "float32"),)
        if part == "denoiser":
            return DenoiserPart(model).eval(), PartSpec(part, inputs, out)
        if part == "denoiser_cfg":
            wrapper = GuidedDenoiserPart(model, facts["null_class"], chans)
            return wrapper.eval(), PartSpec(part, inputs + (TensorSpec("cfg_scale", ("B",), "float32"),), out)
    raise ValueError(f"a {kind} has no part {part!r}; its parts are "
                     f"{TOKENIZER_PARTS if kind == 'tokenizer' else GENERATOR_PARTS}")


def model_facts(model: nn.Module) -> dict[str, Any]:
    """What a server needs besides the graph: kind plus tokenizer or generator facts."""
    kind = model_kind(model)
    facts = tokenizer_facts(model) if kind == "tokenizer" else generator_facts(model)
    return {"kind": kind, **facts}
