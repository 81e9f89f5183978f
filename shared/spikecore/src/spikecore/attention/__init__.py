"""Spiking attention primitives : functional cores and modules, [T, B, C, N]."""

from .functional import fb_lidiff, ff_lidiff, qkca, qkta, sdsa, split_heads, ssa
from .modules import (
    ChannelQKAttention,
    FBLiDiffAttention,
    FFLiDiffAttention,
    SpikeDrivenSelfAttention,
    SpikingSelfAttention,
    TokenQKAttention,
)

__all__ = [
    "ChannelQKAttention",
    "FBLiDiffAttention",
    "FFLiDiffAttention",
    "SpikeDrivenSelfAttention",
    "SpikingSelfAttention",
    "TokenQKAttention",
    "fb_lidiff",
    "ff_lidiff",
    "qkca",
    "qkta",
    "sdsa",
    "split_heads",
    "ssa",
]
