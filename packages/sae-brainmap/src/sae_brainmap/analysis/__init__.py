"""Analyses of the voxel dictionary: ROI structure (RSA), the layer hierarchy, and an encoding baseline."""

from .encoding import EncodingResult, ridge_encoding
from .hierarchy import best_layer, latents_per_roi, layer_r, roi_layer_counts
from .rsa import RSAResult, rsa
from .selectivity import RoiLatent, patch_activation_map, roi_selectivity

__all__ = [
    "EncodingResult",
    "RSAResult",
    "RoiLatent",
    "best_layer",
    "latents_per_roi",
    "layer_r",
    "patch_activation_map",
    "ridge_encoding",
    "roi_layer_counts",
    "roi_selectivity",
    "rsa",
]
