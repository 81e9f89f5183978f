"""SAE-BrainMap (arXiv 2506.11123): layer-wise ViT activations, sparse autoencoders, and their alignment
with voxels (streaming top-k similarity, the voxel dictionary, NSD / Algonauts readers, a synthetic
subject on pycortex's S1)."""

import importlib.metadata

from .alignment import top_matches
from .backbone import DEFAULT_BACKBONE, Backbone, ViTBackbone, build_backbone
from .brainmap import BrainMapSAE
from .checkpoint import SAECheckpointError, load_sae, save_sae
from .data import ImageDataModule, StoreDataModule
from .dictionary import VoxelDictionary, build_voxel_dictionary
from .images import EmbeddedImages, FolderImages, NSDImages
from .metrics import FiringCounter, batch_metrics
from .module import SAEModule, SAETrainingError, StopWhenConverged, train_sae
from .sae import KINDS, SAE, SAEConfig, default_lr, make_sae
from .spiking import SpikeRateBackbone
from .store import ActivationStore, StoreError, extract_activations

__version__ = importlib.metadata.version("sae-brainmap")  # one source: pyproject.toml

__all__ = [
    "DEFAULT_BACKBONE",
    "KINDS",
    "SAE",
    "ActivationStore",
    "Backbone",
    "BrainMapSAE",
    "EmbeddedImages",
    "FiringCounter",
    "FolderImages",
    "ImageDataModule",
    "NSDImages",
    "SAECheckpointError",
    "SAEConfig",
    "SAEModule",
    "SAETrainingError",
    "SpikeRateBackbone",
    "StopWhenConverged",
    "StoreDataModule",
    "StoreError",
    "ViTBackbone",
    "VoxelDictionary",
    "batch_metrics",
    "build_backbone",
    "build_voxel_dictionary",
    "default_lr",
    "extract_activations",
    "load_sae",
    "make_sae",
    "save_sae",
    "top_matches",
    "train_sae",
]
