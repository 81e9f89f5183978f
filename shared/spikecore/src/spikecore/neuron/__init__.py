"""Multi-step LIF neurons: the fused op, the stateful module, the reference loop and surrogates."""

from .module import LIF, reset
from .ops import BACKENDS, lif_multi_step
from .reference import lif_reference
from .surrogate import SURROGATES, heaviside

__all__ = ["BACKENDS", "LIF", "SURROGATES", "heaviside", "lif_multi_step", "lif_reference", "reset"]
