"""Analyses of the voxel dictionary: ROI structure (RSA), the layer hierarchy, and an encoding baseline."""

from .encoding import EncodingResult, ridge_encoding
from .hierarchy import best_layer, latents_per_roi, layer_r, roi_layer_counts
from .rsa import RSAResult, rsa

__all__ = [
    "EncodingResult",
    "RSAResult",
    "best_layer",
    "latents_per_roi",
    "layer_r",
    "ridge_encoding",
    "roi_layer_counts",
    "rsa",
]
