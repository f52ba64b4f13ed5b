"""Small reusable layers (ViT trunk, attention, pixel heads)."""

from models.layers.vit import (
    Attention,
    Block,
    ToPixel,
    VisionTransformer,
    set_fused_attention,
    unpatchify,
)

__all__ = ["Attention", "Block", "ToPixel", "VisionTransformer", "set_fused_attention", "unpatchify"]
