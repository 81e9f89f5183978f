"""Spiking vision backbones shared by the training packages (timm style: ``create_model(name)``).

Every model follows :class:`SpikingBackbone` (stem, ``blocks`` with q/k/v/x extras for feedback,
``forward_features`` / ``forward_head``). Registered variants: ``list_models()``.
"""

from . import qkformer, sdt, spikformer
from .base import EXTRA_KEYS, SpikingBackbone
from .layers import ATTENTION, SpikingBlock, make_attention
from .qkformer import QKFormer
from .registry import create_model, list_models, register_model
from .sdt import SpikeDrivenTransformer
from .spikformer import Spikformer
from .stochastic_depth import TimeMajorDropPath, drop_path, hold_drop_path_masks

__all__ = [
    "ATTENTION",
    "EXTRA_KEYS",
    "QKFormer",
    "SpikeDrivenTransformer",
    "Spikformer",
    "SpikingBackbone",
    "SpikingBlock",
    "TimeMajorDropPath",
    "create_model",
    "drop_path",
    "hold_drop_path_masks",
    "list_models",
    "make_attention",
    "qkformer",
    "register_model",
    "sdt",
    "spikformer",
]
