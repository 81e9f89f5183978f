"""SpiLiFormer: spiking transformers with lateral-inhibition attention (arXiv 2503.15986), on spikecore."""

import importlib.metadata

from .attention import KVDifferenceAttention
from .convert import load_authors_checkpoint
from .feedback import FeedbackDecoder, FeedbackGenerator
from .model import SpiLiFormer, TimeBatchLIF, lateral_inhibition_off
from .module import BetaRamp, SpiLiFormerClassifier, beta_at
from .registry import create_model, list_models

__version__ = importlib.metadata.version("spiliformer")  # one source: pyproject.toml

__all__ = [
    "BetaRamp",
    "FeedbackDecoder",
    "FeedbackGenerator",
    "KVDifferenceAttention",
    "SpiLiFormer",
    "SpiLiFormerClassifier",
    "TimeBatchLIF",
    "beta_at",
    "create_model",
    "lateral_inhibition_off",
    "list_models",
    "load_authors_checkpoint",
]
