"""Analyses of the voxel dictionary: ROI structure (RSA), the layer hierarchy, and an encoding baseline;
the streamed similarity statistics behind the paper's headline and the latent -> voxel mapping."""

from .encoding import EncodingResult, ridge_encoding
from .hierarchy import best_layer, latents_per_roi, layer_r, roi_layer_counts
from .latent_mapping import LatentMapping, latent_mapping
from .rsa import RSAResult, rsa
from .selectivity import RoiLatent, patch_activation_map, roi_selectivity, roi_selectivity_per_layer
from .similarity_stats import (
    LayerSimilarity,
    headline,
    layer_scores,
    layer_similarity,
    load_similarity_stats,
    save_similarity_stats,
    similarity_stats,
)

__all__ = [
    "EncodingResult",
    "LatentMapping",
    "LayerSimilarity",
    "RSAResult",
    "RoiLatent",
    "best_layer",
    "headline",
    "latent_mapping",
    "latents_per_roi",
    "layer_r",
    "layer_scores",
    "layer_similarity",
    "load_similarity_stats",
    "patch_activation_map",
    "ridge_encoding",
    "roi_layer_counts",
    "roi_selectivity",
    "roi_selectivity_per_layer",
    "rsa",
    "save_similarity_stats",
    "similarity_stats",
]
