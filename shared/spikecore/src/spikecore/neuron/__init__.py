"""Multi-step LIF neurons: the fused op, the stateful module, the reference loop, surrogates, and the neuron's
settings as one value (``NeuronConfig``)."""

from .config import ATTENTION_NEURON, BACKBONE_NEURON, DEFAULT_NEURON, NeuronConfig
from .module import LIF, reset
from .ops import BACKENDS, lif_multi_step
from .reference import lif_reference
from .surrogate import SURROGATES, heaviside

__all__ = [
    "ATTENTION_NEURON",
    "BACKBONE_NEURON",
    "BACKENDS",
    "DEFAULT_NEURON",
    "LIF",
    "SURROGATES",
    "NeuronConfig",
    "heaviside",
    "lif_multi_step",
    "lif_reference",
    "reset",
]
