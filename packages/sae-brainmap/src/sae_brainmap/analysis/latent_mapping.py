"""The authors' latent -> voxel mapping: each latent's best voxel, and where the latents land.

The voxel dictionary goes voxel -> latent (each voxel's best latent); the mapping here goes the other way:
for every latent of every layer, the voxel with the highest r (``argmax_v S_l[k, v]``, from the streamed
statistics of :mod:`~sae_brainmap.analysis.similarity_stats`). Counting the latents per voxel gives the
cortical density map; counting them per ROI and layer gives the authors' per-ROI bar plots (how many of a
layer's latents land in each ROI). A constant (dead) latent has no best voxel and is counted apart (the
authors' ``torch.max`` over a row of zeros puts every dead latent on the first voxel instead).
"""

from dataclasses import dataclass

import numpy as np

from .similarity_stats import LayerSimilarity

OUTSIDE = "outside the ROIs"  # voxels with no listed ROI (NSD: a voxel outside every listed ROI)


@dataclass
class LatentMapping:
    layers: list[int]
    rois: list[str]
    density: np.ndarray  # [L, V] int64: per layer, how many of its latents have voxel v as their best
    roi_layer_counts: np.ndarray  # [R, L] int64: latents of each layer whose best voxel is in each ROI
    outside: np.ndarray  # [L]: latents whose best voxel is in no listed ROI
    unassigned: np.ndarray  # [L]: latents with no best voxel (constant over the images)
    n_latents: np.ndarray  # [L]
    roi_voxels: np.ndarray  # [R]: voxels per ROI (the count expected from uniformly placed latents)

    def numbers(self) -> dict:
        """The JSON form: counts per ROI and layer, the rest per layer, the uniform expectation."""
        n_voxels = self.density.shape[1]
        assigned = self.n_latents - self.unassigned
        return {
            "layers": self.layers,
            "roi_layer_counts": {r: self.roi_layer_counts[i].tolist() for i, r in enumerate(self.rois)},
            "outside_rois": self.outside.tolist(),
            "no_best_voxel": self.unassigned.tolist(),
            "n_latents": self.n_latents.tolist(),
            # where uniformly placed latents would land: a layer's assigned latents x the ROI's voxel share
            "uniform_expectation": {
                r: (assigned * self.roi_voxels[i] / max(n_voxels, 1)).tolist()
                for i, r in enumerate(self.rois)
            },
            "max_latents_per_voxel": int(self.density.sum(0).max()) if n_voxels else 0,
            "voxels_with_latents": int((self.density.sum(0) > 0).sum()),
        }


def latent_mapping(
    stats: dict[int, LayerSimilarity], roi_of_voxel: np.ndarray, rois: list[str]
) -> LatentMapping:
    """Count each layer's latents by their best voxel: per voxel (the density) and per ROI."""
    roi_of_voxel = np.asarray(roi_of_voxel).astype(str)
    layers = sorted(stats)
    n_voxels = len(roi_of_voxel)
    density = np.zeros((len(layers), n_voxels), np.int64)
    counts = np.zeros((len(rois), len(layers)), np.int64)
    outside = np.zeros(len(layers), np.int64)
    unassigned = np.zeros(len(layers), np.int64)
    n_latents = np.zeros(len(layers), np.int64)
    for j, lay in enumerate(layers):
        s = stats[lay]
        if s.n_voxels != n_voxels:
            raise ValueError(f"layer {lay}: statistics over {s.n_voxels} voxels, but {n_voxels} ROI labels")
        best = s.latent_argmax.numpy()
        n_latents[j] = len(best)
        unassigned[j] = int((best < 0).sum())
        density[j] = np.bincount(best[best >= 0], minlength=n_voxels)
        for i, roi in enumerate(rois):
            counts[i, j] = int(density[j][roi_of_voxel == roi].sum())
        outside[j] = int(density[j][~np.isin(roi_of_voxel, rois)].sum())
    roi_voxels = np.asarray([int((roi_of_voxel == r).sum()) for r in rois], np.int64)
    return LatentMapping(layers, list(rois), density, counts, outside, unassigned, n_latents, roi_voxels)
