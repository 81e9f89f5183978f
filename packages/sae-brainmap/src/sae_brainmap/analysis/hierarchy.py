"""The layer hierarchy: which layer best explains each voxel, and how that is distributed over ROIs.

Two rules for a voxel's per-layer score: ``"max"`` (the best latent's r: the dictionary's rule) and
``"mean"`` (the mean r over all of the layer's latents, which needs no argmax: it is the voxel's
correlation with the mean of the layer's normalised latent columns, one matrix-vector product).
"""

import numpy as np
import torch

import spikecore


def _normalised(x: torch.Tensor) -> torch.Tensor:
    x = x.double() - x.double().mean(0)
    norm = x.norm(dim=0)
    return torch.where(norm > 0, x / norm.clamp_min(1e-300), torch.zeros_like(x))


def layer_r(layer_acts: dict[int, torch.Tensor], responses: torch.Tensor, rule: str = "max") -> np.ndarray:
    """``[n_layers, V]``: each layer's score for each voxel (layers in sorted order)."""
    if rule not in ("max", "mean"):
        raise ValueError(f"rule must be 'max' or 'mean', got {rule!r}")
    rows = []
    for layer in sorted(layer_acts):
        acts = layer_acts[layer]
        if rule == "max":
            rows.append(spikecore.topk_similarity(acts, responses, k=1)[0][:, 0].double().numpy())
        else:
            mean_col = _normalised(acts).mean(1)  # [N]: the mean of the normalised latent columns
            rows.append((mean_col @ _normalised(responses)).numpy())
    return np.stack(rows)


def best_layer(scores: np.ndarray, layers: list[int]) -> np.ndarray:
    """``[V]``: the layer with the highest score per voxel (the earlier layer on ties)."""
    return np.asarray(layers)[np.argmax(scores, axis=0)]


def roi_layer_counts(
    best: np.ndarray, roi_of_voxel: np.ndarray, rois: list[str], layers: list[int]
) -> np.ndarray:
    """``[n_rois, n_layers]``: how many of each ROI's voxels have each layer as their best."""
    out = np.zeros((len(rois), len(layers)), dtype=np.int64)
    pos = {layer: j for j, layer in enumerate(layers)}
    for i, roi in enumerate(rois):
        for layer in best[roi_of_voxel == roi]:
            if layer in pos:
                out[i, pos[layer]] += 1
    return out


def latents_per_roi(
    layer: np.ndarray, latent: np.ndarray, roi_of_voxel: np.ndarray, rois: list[str], layers: list[int]
) -> np.ndarray:
    """``[n_rois, n_layers]``: the number of distinct latents of each layer in each ROI's dictionary."""
    out = np.zeros((len(rois), len(layers)), dtype=np.int64)
    for i, roi in enumerate(rois):
        in_roi = roi_of_voxel == roi
        for j, lay in enumerate(layers):
            out[i, j] = len(np.unique(latent[in_roi & (layer == lay)]))
    return out
