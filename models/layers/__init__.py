"""Small reusable layers (ViT trunk, attention, pixel heads)."""

from models.layers.attention import attend, attention_mode, get_attention_mode, set_attention_mode
from models.layers.vit import (
    Attention,
    Block,
    ToPixel,
    VisionTransformer,
    set_fused_attention,
    unpatchify,
)

__all__ = ["Attention", "Block", "ToPixel", "VisionTransformer", "attend", "attention_mode", "get_attention_mode",
           "set_attention_mode", "set_fused_attention", "unpatchify"]
