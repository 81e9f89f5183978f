"""spikecore: fused multi-step LIF neurons (settings as one ``NeuronConfig``) and spiking attention primitives
shared by the packages."""

import importlib.metadata

from . import attention
from .attention import (
    ChannelQKAttention,
    FBLiDiffAttention,
    FFLiDiffAttention,
    SpikeDrivenSelfAttention,
    SpikingSelfAttention,
    TokenQKAttention,
)
from .neuron import (
    BACKBONE_NEURON,
    BACKENDS,
    LIF,
    SURROGATES,
    NeuronConfig,
    heaviside,
    lif_multi_step,
    lif_reference,
    reset,
)
from .similarity import topk_similarity

__version__ = importlib.metadata.version("spikecore")  # one source: pyproject.toml

__all__ = [
    "BACKBONE_NEURON",
    "BACKENDS",
    "LIF",
    "SURROGATES",
    "ChannelQKAttention",
    "FBLiDiffAttention",
    "FFLiDiffAttention",
    "NeuronConfig",
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
