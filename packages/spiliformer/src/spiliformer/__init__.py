"""SpiLiFormer: spiking transformers with lateral-inhibition attention (arXiv 2503.15986), on spikecore."""

from .attention import KVDifferenceAttention
from .feedback import FeedbackDecoder, FeedbackGenerator
from .model import SpiLiFormer, lateral_inhibition_off
from .module import SpiLiFormerClassifier
from .registry import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "FeedbackDecoder",
    "FeedbackGenerator",
    "KVDifferenceAttention",
    "SpiLiFormer",
    "SpiLiFormerClassifier",
    "create_model",
    "lateral_inhibition_off",
    "list_models",
]
