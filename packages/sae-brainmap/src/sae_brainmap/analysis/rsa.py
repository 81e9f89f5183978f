"""Representational similarity over voxels: does the dictionary keep the brain's voxel-by-voxel structure?

The brain's ``[V, V]`` correlation matrix (over images) and the model's (the voxels' dictionary
activations, or a raw-neuron baseline built the same way from the residual stream) are compared by the
Spearman correlation of their upper triangles. Significance is a permutation (Mantel) test: the voxel
labels of the model matrix are shuffled, which permutes its entries, so its ranks are computed once and
only re-indexed per permutation.
"""

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


@dataclass
class RSAResult:
    rho: float  # Spearman correlation of the two upper triangles
    p_value: float  # one-sided permutation p: (1 + #null >= rho) / (1 + permutations)
    null: np.ndarray  # the permutation distribution of rho


def _voxel_corr(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"expected responses [N images >= 3, V voxels], got shape {x.shape}")
    std = x.std(0)
    if (std == 0).any():
        raise ValueError(f"{int((std == 0).sum())} voxel(s) are constant over images: drop them before RSA")
    return np.corrcoef(x, rowvar=False)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def rsa(brain: np.ndarray, model: np.ndarray, permutations: int = 1000, seed: int = 0) -> RSAResult:
    """RSA between ``brain`` ``[N, V]`` and ``model`` ``[N, V]`` (the same voxels, the same images)."""
    brain, model = np.asarray(brain), np.asarray(model)
    if brain.shape != model.shape:
        raise ValueError(f"brain {brain.shape} and model {model.shape} must both be [N images, V voxels]")
    if brain.shape[1] < 3:
        raise ValueError("RSA needs at least 3 voxels")
    iu = np.triu_indices(brain.shape[1], k=1)
    brain_ranks = rankdata(_voxel_corr(brain)[iu])
    model_corr = _voxel_corr(model)
    model_ranks = np.zeros_like(model_corr)
    model_ranks[iu] = rankdata(model_corr[iu])
    model_ranks = model_ranks + model_ranks.T  # symmetric, so a permuted upper triangle is a gather
    rho = _pearson(brain_ranks, model_ranks[iu])  # Spearman = Pearson of ranks (ties: average ranks)
    rng = np.random.default_rng(seed)
    null = np.empty(permutations)
    for i in range(permutations):
        p = rng.permutation(brain.shape[1])
        null[i] = _pearson(brain_ranks, model_ranks[p[iu[0]], p[iu[1]]])
    p_value = (1 + int((null >= rho).sum())) / (1 + permutations)
    return RSAResult(rho=rho, p_value=p_value, null=null)
