"""TDFormer: spiking transformers with top-down temporal feedback (arXiv 2505.15840), on spikecore."""

import importlib.metadata

from .feedback import ControlModule, ProcessingModule
from .model import TDFormer
from .module import TDFormerClassifier
from .registry import create_model, list_models

__version__ = importlib.metadata.version("tdformer")  # one source: pyproject.toml

__all__ = [
    "ControlModule",
    "ProcessingModule",
    "TDFormer",
    "TDFormerClassifier",
    "create_model",
    "list_models",
]
