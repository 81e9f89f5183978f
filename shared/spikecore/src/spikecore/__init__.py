"""spikecore: fused multi-step LIF neurons and spiking attention primitives shared by the packages."""

from . import attention
from .attention import (
    ChannelQKAttention,
    FBLiDiffAttention,
    FFLiDiffAttention,
    SpikeDrivenSelfAttention,
    SpikingSelfAttention,
    TokenQKAttention,
)
from .neuron import BACKENDS, LIF, SURROGATES, heaviside, lif_multi_step, lif_reference, reset
from .similarity import topk_similarity

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "LIF",
    "SURROGATES",
    "ChannelQKAttention",
    "FBLiDiffAttention",
    "FFLiDiffAttention",
    "SpikeDrivenSelfAttention",
    "SpikingSelfAttention",
    "TokenQKAttention",
    "attention",
    "heaviside",
    "lif_multi_step",
    "lif_reference",
    "reset",
    "topk_similarity",
]
