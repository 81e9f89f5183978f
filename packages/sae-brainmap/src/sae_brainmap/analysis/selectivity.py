"""ROI-consistent selectivity: for each ROI, the latents its voxels map to, and what drives them.

A latent's standing in an ROI is the mean r over the ROI's voxels whose dictionary entry it is (ties:
more voxels, then the smaller (layer, latent)). For each top latent, the images that activate it most, and
its activation over the patch grid of an image (a heat map to lay over the picture).
"""

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class RoiLatent:
    layer: int
    latent: int
    n_voxels: int  # voxels of the ROI whose dictionary entry is this latent
    mean_r: float  # their mean r
    top_images: list[int] = field(default_factory=list)  # rows of the activations, most active first


def roi_selectivity(
    layer: np.ndarray,
    latent: np.ndarray,
    r: np.ndarray,
    roi_of_voxel: np.ndarray,
    rois: list[str],
    layer_acts: dict[int, torch.Tensor] | None = None,
    top_latents: int = 5,
    top_images: int = 8,
) -> dict[str, list[RoiLatent]]:
    """Per ROI, its ``top_latents`` dictionary latents by mean r, each with its ``top_images`` (when
    ``layer_acts`` ``{layer: [N, U]}`` is given). Voxels without a dictionary entry (layer -1) are left
    out."""
    layer, latent, r, roi_of_voxel = (np.asarray(a) for a in (layer, latent, r, roi_of_voxel))
    if not (len(layer) == len(latent) == len(r) == len(roi_of_voxel)):
        raise ValueError("layer, latent, r and roi_of_voxel must have one entry per voxel")
    out: dict[str, list[RoiLatent]] = {}
    for roi in rois:
        keep = (roi_of_voxel == roi) & (layer >= 0)
        pairs, inverse, counts = np.unique(
            np.stack([layer[keep], latent[keep]], 1), axis=0, return_inverse=True, return_counts=True
        )
        if not len(pairs):
            out[roi] = []
            continue
        mean_r = np.bincount(inverse.ravel(), weights=r[keep], minlength=len(pairs)) / counts
        # sort by mean r (desc), then voxel count (desc), then (layer, latent) (asc, already unique's order)
        order = np.lexsort((np.arange(len(pairs)), -counts, -mean_r))[:top_latents]
        entries = []
        for i in order:
            lay, lat = int(pairs[i, 0]), int(pairs[i, 1])
            images: list[int] = []
            if layer_acts is not None:
                acts = layer_acts[lay][:, lat].double().numpy()
                images = np.argsort(-acts, kind="stable")[:top_images].tolist()
            entries.append(RoiLatent(lay, lat, int(counts[i]), float(mean_r[i]), images))
        out[roi] = entries
    return out


def patch_activation_map(patch_codes: torch.Tensor, latent: int, grid: tuple[int, int]) -> np.ndarray:
    """A latent's activation over an image's patches: ``patch_codes`` ``[P, U]`` (P = grid cells, patch
    tokens in raster order) -> ``[H, W]``."""
    if patch_codes.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"{patch_codes.shape[0]} patch codes do not fill a {grid[0]} x {grid[1]} grid")
    return patch_codes[:, latent].double().reshape(grid).numpy()
