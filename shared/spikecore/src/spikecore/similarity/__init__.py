"""Streaming top-k similarity: for every column of B, the k most similar columns of A.

``topk_similarity(A [N, U], B [N, V], k, centered)`` ranks A's columns for each of B's by Pearson r
(``centered=True``) or plain cosine without ever holding the ``[U, V]`` similarity matrix: chunked
PyTorch on the CPU, one Triton kernel (tiled matmul with a running top-k) on CUDA. SAE-BrainMap uses it
to match 12 x 12,288 SAE latents against tens of thousands of voxels. ``similarity_tiles`` walks the
same matrix tile by tile for other streamed statistics (SAE-BrainMap's per-voxel and per-latent maxima).
"""

from .ops import similarity_tiles, topk_similarity
from .reference import column_stats, topk_similarity_reference

__all__ = ["column_stats", "similarity_tiles", "topk_similarity", "topk_similarity_reference"]
