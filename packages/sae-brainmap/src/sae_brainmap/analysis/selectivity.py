"""ROI-consistent selectivity: for each ROI, the latents that track its voxels best, and what drives them.

A latent's score for an ROI is its mean Pearson r over all of the ROI's voxels. That mean is the dot
product of the latent's normalised column with the mean of the voxels' normalised columns, so every
latent of every layer is scored with one matrix-vector product per layer and ROI. For each top latent:
the images that activate it most, and its activation over an image's patch grid (a heat map to lay over
the picture). Those maps need the SAE codes of every patch token, which the pipeline does not keep (it
stores per-image means): :func:`latent_patch_maps` recomputes them for just the few images drawn.
"""

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class RoiLatent:
    layer: int
    latent: int
    mean_r: float  # mean Pearson r over the ROI's voxels
    top_images: list[int] = field(default_factory=list)  # rows of the activations, most active first
    top_activations: list[float] = field(default_factory=list)  # the latent's activation on each of them


def _normalised(x: torch.Tensor) -> torch.Tensor:
    x = x.double() - x.double().mean(0)
    norm = x.norm(dim=0)
    return torch.where(norm > 0, x / norm.clamp_min(1e-300), torch.zeros_like(x))


def roi_selectivity(
    layer_acts: dict[int, torch.Tensor],
    responses: torch.Tensor,
    roi_of_voxel: np.ndarray,
    rois: list[str],
    top_latents: int = 5,
    top_images: int = 8,
) -> dict[str, list[RoiLatent]]:
    """Per ROI, the ``top_latents`` (layer, latent) pairs with the highest mean r over its voxels (ties:
    the smaller layer, then latent), each with its ``top_images``. ``layer_acts``: ``{layer: [N, U]}``;
    ``responses``: ``[N, V]``; constant columns count as r = 0."""
    roi_of_voxel = np.asarray(roi_of_voxel)
    if len(roi_of_voxel) != responses.shape[1]:
        raise ValueError(f"{len(roi_of_voxel)} ROI labels for {responses.shape[1]} voxels")
    layers = sorted(layer_acts)
    normed = {lay: _normalised(layer_acts[lay]) for lay in layers}
    b = _normalised(responses)
    out: dict[str, list[RoiLatent]] = {}
    for roi in rois:
        cols = np.flatnonzero(roi_of_voxel == roi)
        if not len(cols):
            out[roi] = []
            continue
        target = b[:, torch.from_numpy(cols)].mean(1)  # [N]
        scores = torch.cat([normed[lay].T @ target for lay in layers]).numpy()
        owner = np.concatenate([[(lay, u) for u in range(normed[lay].shape[1])] for lay in layers])
        order = np.argsort(-scores, kind="stable")[:top_latents]  # stable: ties keep (layer, latent) order
        entries = []
        for i in order:
            lay, lat = int(owner[i][0]), int(owner[i][1])
            acts = layer_acts[lay][:, lat].double().numpy()
            images = np.argsort(-acts, kind="stable")[:top_images].tolist()
            entries.append(RoiLatent(lay, lat, float(scores[i]), images, acts[images].tolist()))
        out[roi] = entries
    return out


def roi_selectivity_per_layer(
    layer_acts: dict[int, torch.Tensor],
    responses: torch.Tensor,
    roi_of_voxel: np.ndarray,
    rois: list[str],
    top_latents: int = 100,
) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """The authors' ranking: per ROI and per layer, that layer's ``top_latents`` latents by mean r over
    the ROI's voxels (ties: the smaller latent), as ``(latent, mean r)`` pairs, best first. An ROI
    without voxels gets ``{}``."""
    roi_of_voxel = np.asarray(roi_of_voxel)
    if len(roi_of_voxel) != responses.shape[1]:
        raise ValueError(f"{len(roi_of_voxel)} ROI labels for {responses.shape[1]} voxels")
    if top_latents < 1:
        raise ValueError(f"top_latents must be at least 1, got {top_latents}")
    b = _normalised(responses)
    targets = {}
    for roi in rois:
        cols = np.flatnonzero(roi_of_voxel == roi)
        if len(cols):
            targets[roi] = b[:, torch.from_numpy(cols)].mean(1)  # [N]
    out: dict[str, dict[int, list[tuple[int, float]]]] = {roi: {} for roi in rois}
    for lay in sorted(layer_acts):
        normed = _normalised(layer_acts[lay])  # one layer's normalised columns at a time
        for roi, target in targets.items():
            scores = (normed.T @ target).numpy()
            order = np.argsort(-scores, kind="stable")[:top_latents]
            out[roi][lay] = [(int(u), float(scores[u])) for u in order]
    return out


def patch_grid(backbone, layer: int = 0) -> tuple[int, int]:
    """The (rows, columns) of a backbone's patch tokens at ``layer`` (a spiking QKFormer's stages differ)."""
    return tuple(int(g) for g in backbone.patch_grid(layer))


def latent_patch_maps(
    backbone,
    saes: dict,
    source,
    requests: list[tuple[int, int, int]],
    batch_size: int = 16,
) -> dict[tuple[int, int, int], np.ndarray]:
    """``{(layer, latent, image): [rows, cols]}``: each requested latent's activation over the image's
    patch grid, for ``requests`` of ``(layer, latent, image)`` (``image`` indexes ``source``).

    Only the requested images go through ``backbone`` (a :class:`~sae_brainmap.backbone.Backbone`), a batch
    at a time and (a ViT) only up to the deepest requested layer; ``saes`` (``{layer: SAE}``) encode their
    patch tokens and only the requested latents' columns are kept, so memory is one batch of codes."""
    missing = sorted({lay for lay, _, _ in requests} - set(saes))
    if missing:
        raise ValueError(f"no SAE for layer(s) {missing}")
    bad = sorted({img for _, _, img in requests if not 0 <= img < len(source)})
    if bad:
        raise ValueError(f"image(s) {bad} out of range: the image source has {len(source)} images")
    images = sorted({img for _, _, img in requests})
    maps: dict[tuple[int, int, int], np.ndarray] = {}
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        wanted = [r for r in requests if r[2] in batch]
        layers = sorted({lay for lay, _, _ in wanted})
        x = torch.stack([backbone.preprocess(source[i]) for i in batch])
        streams = backbone(x, layers)
        for lay in layers:
            patch = backbone.select_tokens(streams[lay], "patch").float()
            with torch.no_grad():
                codes = saes[lay].encode(patch.reshape(-1, patch.shape[-1])).reshape(*patch.shape[:2], -1)
            for r in (r for r in wanted if r[0] == lay):
                maps[r] = patch_activation_map(codes[batch.index(r[2])], r[1], patch_grid(backbone, lay))
    return maps


def patch_activation_map(patch_codes: torch.Tensor, latent: int, grid: tuple[int, int]) -> np.ndarray:
    """A latent's activation over an image's patches: ``patch_codes`` ``[P, U]`` (P = grid cells, patch
    tokens in raster order) -> ``[H, W]``."""
    if patch_codes.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"{patch_codes.shape[0]} patch codes do not fill a {grid[0]} x {grid[1]} grid")
    return patch_codes[:, latent].double().reshape(grid).numpy()
