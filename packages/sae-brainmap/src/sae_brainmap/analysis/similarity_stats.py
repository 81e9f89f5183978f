"""What one streamed pass over a layer's ``[latents, voxels]`` similarity matrix can tell, and the headline.

The paper's numbers all come from the per-layer similarity matrices ``S_l[k, v]`` (Pearson r, or cosine,
between latent k's activations and voxel v's responses over the images), which at full size (12 x 12,288
latents x 40,000 voxels) are never held: :func:`layer_similarity` walks ``S_l`` tile by tile with
``spikecore.similarity.similarity_tiles``, the walk of :func:`spikecore.topk_similarity`, and keeps, in one
pass:

- per voxel: the largest r over the layer's latents and which latent (the voxel dictionary's per-layer
  candidate, the "max" rule of the layer hierarchy), and the mean r over all of the layer's latents (the
  "mean" rule; a constant latent counts as r = 0, as in the authors' code, where its norm is 1e-8);
- per latent: the largest r over voxels and which voxel (the authors' latent -> voxel mapping).

Ties go to the smaller index (latent, voxel). A constant latent never wins a voxel and has no best voxel
(-1); a constant voxel never wins a latent and has no best latent (value 0, index -1), as in
:func:`~sae_brainmap.alignment.top_matches`.

:func:`headline` turns the per-voxel maxima of the SAE latents and of the raw residual-stream neurons into
the authors' printout ("SAEs max and mean similarity" / "Neurons max and mean similarity": over voxels,
the max and the mean of each voxel's best r), for all layers together, per layer and per ROI.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spikecore.similarity import column_stats, similarity_tiles
from spikecore.similarity.ops import check_finite

from ..alignment import check_pair

MODELS = ("sae", "neurons")  # the SAE latents and the raw residual-stream dimensions ("neurons")


@dataclass
class LayerSimilarity:
    """One layer's streamed statistics of ``S[k, v]`` (U latents, V voxels)."""

    voxel_max: Tensor  # [V] float32: max_k S[k, v] over non-constant latents (0 where none)
    voxel_argmax: Tensor  # [V] int64: that latent (-1: a constant voxel, or no non-constant latent)
    voxel_mean: Tensor  # [V] float64: mean_k S[k, v] over all U latents (constant ones count as 0)
    latent_max: Tensor  # [U] float32: max_v S[k, v] over non-constant voxels (0 where none)
    latent_argmax: Tensor  # [U] int64: that voxel (-1: a constant latent, or no non-constant voxel)

    @property
    def n_latents(self) -> int:
        return int(self.latent_max.shape[0])

    @property
    def n_voxels(self) -> int:
        return int(self.voxel_max.shape[0])


def layer_similarity(
    acts: Tensor, responses: Tensor, centered: bool = True, *, chunk: int = 2048
) -> LayerSimilarity:
    """The streamed statistics of ``S[k, v]`` between the columns of ``acts`` ``[N, U]`` and
    ``responses`` ``[N, V]``: one pass, ``chunk x chunk`` similarities and ``N x chunk`` normalised
    columns at a time, ``O(U + V)`` running results."""
    check_pair(acts, responses)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    a, b = acts, responses.to(acts.device)
    U, V = a.shape[1], b.shape[1]
    ma, ia = column_stats(a, centered, chunk)
    mb, ib = column_stats(b, centered, chunk)
    check_finite(ma, ia, mb, ib)
    dead_a, dead_b = ia == 0, ib == 0
    device = a.device
    v_max = torch.full((V,), float("-inf"), device=device)
    v_arg = torch.full((V,), -1, dtype=torch.int64, device=device)
    v_sum = torch.zeros(V, dtype=torch.float64, device=device)
    u_max = torch.full((U,), float("-inf"), device=device)
    u_arg = torch.full((U,), -1, dtype=torch.int64, device=device)
    with torch.no_grad():
        for u0, v0, tile in similarity_tiles(a, b, (ma, ia), (mb, ib), chunk):  # [cu, cv]
            u1, v1 = u0 + tile.shape[0], v0 + tile.shape[1]
            v_sum[v0:v1] += tile.sum(0)  # constant rows / columns are 0 here; a float64 running sum
            tile[dead_a[u0:u1]] = float("-inf")  # constant latents win no voxel
            tile[:, dead_b[v0:v1]] = float("-inf")  # constant voxels win no latent
            m, i = tile.max(dim=0)  # the first maximal latent on ties
            better = m > v_max[v0:v1]  # strictly: a tie keeps the earlier (smaller) latent
            v_max[v0:v1] = torch.where(better, m, v_max[v0:v1])
            v_arg[v0:v1] = torch.where(better, i + u0, v_arg[v0:v1])
            m, i = tile.max(dim=1)
            better = m > u_max[u0:u1]
            u_max[u0:u1] = torch.where(better, m, u_max[u0:u1])
            u_arg[u0:u1] = torch.where(better, i + v0, u_arg[u0:u1])
    v_none, u_none = torch.isinf(v_max), torch.isinf(u_max)
    return LayerSimilarity(
        voxel_max=torch.where(v_none, 0.0, v_max).cpu(),
        voxel_argmax=torch.where(v_none, -1, v_arg).cpu(),
        voxel_mean=(v_sum / max(U, 1)).cpu(),
        latent_max=torch.where(u_none, 0.0, u_max).cpu(),
        latent_argmax=torch.where(u_none, -1, u_arg).cpu(),
    )


def similarity_stats(
    layer_acts: dict[int, Tensor], responses: Tensor, centered: bool = True, *, chunk: int = 2048
) -> dict[int, LayerSimilarity]:
    """:func:`layer_similarity` for every layer of ``layer_acts`` ``{layer: [N, U]}``, in layer order."""
    if not isinstance(layer_acts, dict) or not layer_acts:
        raise ValueError("layer_acts must be a non-empty dict {layer index: activations [N, U]}")
    return {
        lay: layer_similarity(layer_acts[lay], responses, centered, chunk=chunk) for lay in sorted(layer_acts)
    }


_VOXEL_FIELDS = ("voxel_max", "voxel_argmax", "voxel_mean")
_LATENT_FIELDS = ("latent_max", "latent_argmax")


def save_similarity_stats(path: str | Path, stats: dict[int, LayerSimilarity]) -> None:
    """``.npz`` (no pickle): ``layers``, ``voxel_*`` ``[L, V]`` and per layer ``latent_*_LL`` ``[U_l]``."""
    layers = sorted(stats)
    arrays = {"layers": np.asarray(layers, np.int64)}
    for f in _VOXEL_FIELDS:
        arrays[f] = np.stack([getattr(stats[lay], f).numpy() for lay in layers])
    for lay in layers:
        for f in _LATENT_FIELDS:
            arrays[f"{f}_{lay:02d}"] = getattr(stats[lay], f).numpy()
    np.savez(path, **arrays)


def load_similarity_stats(path: str | Path) -> dict[int, LayerSimilarity]:
    with np.load(path, allow_pickle=False) as f:
        layers = [int(lay) for lay in f["layers"]]
        return {
            lay: LayerSimilarity(
                **{k: torch.from_numpy(f[k][j]) for k in _VOXEL_FIELDS},
                **{k: torch.from_numpy(f[f"{k}_{lay:02d}"]) for k in _LATENT_FIELDS},
            )
            for j, lay in enumerate(layers)
        }


def layer_scores(stats: dict[int, LayerSimilarity], rule: str = "max") -> np.ndarray:
    """``[n_layers, V]``: each layer's score per voxel under the hierarchy's ``max`` or ``mean`` rule
    (what :func:`~sae_brainmap.analysis.layer_r` computes, read from the streamed statistics)."""
    if rule not in ("max", "mean"):
        raise ValueError(f"rule must be 'max' or 'mean', got {rule!r}")
    field = "voxel_max" if rule == "max" else "voxel_mean"
    return np.stack([getattr(stats[lay], field).double().numpy() for lay in sorted(stats)])


def best_over_layers(stats: dict[int, LayerSimilarity]) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel, the best r over all layers' latents (the voxel dictionary's r) and whether it is
    defined (some layer has a best latent for the voxel)."""
    layers = sorted(stats)
    r = np.stack([stats[lay].voxel_max.double().numpy() for lay in layers])
    ok = np.stack([stats[lay].voxel_argmax.numpy() >= 0 for lay in layers])
    best = np.where(ok, r, -np.inf).max(0)
    defined = ok.any(0)
    return np.where(defined, best, np.nan), defined


def _max_mean(values: np.ndarray) -> dict[str, float | int | None]:
    """Max and mean over voxels of their best r (NaN: undefined, left out), and how many voxels."""
    values = values[np.isfinite(values)]
    if not len(values):
        return {"max": None, "mean": None, "n_voxels": 0}
    return {"max": float(values.max()), "mean": float(values.mean()), "n_voxels": len(values)}


def _per_voxel_best(stats: dict[int, LayerSimilarity]) -> dict[str, np.ndarray]:
    """``{"all": best r over all layers, "<layer>": best r within that layer}`` per voxel, NaN where
    undefined."""
    out = {"all": best_over_layers(stats)[0]}
    for lay, s in sorted(stats.items()):
        r = s.voxel_max.double().numpy()
        out[str(lay)] = np.where(s.voxel_argmax.numpy() >= 0, r, np.nan)
    return out


def chance_best_r(n_candidates: int, n_images: int) -> float | None:
    """About the best r that noise alone reaches: the expected maximum of ``n_candidates`` (K)
    independent Pearson r over ``n_images`` (N) images, through Fisher's z (atanh r ~ Normal(0, 1 / (N -
    3))) and Blom's approximation of the largest of K normal draws: ``tanh(Phi^-1((K - 0.375) / (K +
    0.25)) / sqrt(N - 3))``. Correlated candidates (an SAE's latents are) reach less. More candidates
    (12,288 SAE latents against 768 neurons per layer) lift the best r by chance alone."""
    from scipy.stats import norm

    if n_candidates < 1 or n_images < 4:
        return None
    k = n_candidates
    return float(np.tanh(norm.ppf((k - 0.375) / (k + 0.25)) / np.sqrt(n_images - 3)))


def headline(
    stats_by_model: dict[str, dict[int, LayerSimilarity]],
    roi_of_voxel: np.ndarray,
    rois: list[str],
    n_images: int | None = None,
) -> dict:
    """The max and the mean over voxels of each voxel's best r, per model (``sae``, ``neurons``): over
    all layers (each voxel's best latent anywhere: the authors' printout and the paper's "maximum
    similarity"), per layer (the best latent of that layer), each for all voxels and per ROI.

    ``{model: {"all_layers": {max, mean, n_voxels}, "layers": {"<l>": {...}}, "rois": {roi:
    {"all_layers": {...}, "layers": {"<l>": {...}}}}, "chance_best_r": {"all_layers": x, "layers":
    {...}}}}``; a voxel with no defined r (constant) is left out, an ROI without voxels gets None values;
    ``chance_best_r`` (with ``n_images``): :func:`chance_best_r` for the number of non-constant latents
    searched."""
    roi_of_voxel = np.asarray(roi_of_voxel)
    out = {}
    for model, stats in stats_by_model.items():
        best = _per_voxel_best(stats)
        layers = [k for k in best if k != "all"]
        entry = {"all_layers": _max_mean(best["all"]), "layers": {k: _max_mean(best[k]) for k in layers}}
        if n_images is not None:
            live = {str(lay): int((s.latent_argmax >= 0).sum()) for lay, s in stats.items()}
            entry["chance_best_r"] = {
                "all_layers": chance_best_r(sum(live.values()), n_images),
                "layers": {k: chance_best_r(n, n_images) for k, n in live.items()},
            }
        entry["rois"] = {}
        for roi in rois:
            sel = roi_of_voxel == roi
            entry["rois"][roi] = {
                "all_layers": _max_mean(best["all"][sel]),
                "layers": {k: _max_mean(best[k][sel]) for k in layers},
            }
        out[model] = entry
    return out


HEADLINE_HEADER = ["model", "layer", "roi", "max_r", "mean_r", "n_voxels"]


def headline_rows(h: dict) -> list[list]:
    """The headline as CSV rows (``layer`` "all" for all layers, ``roi`` "all" for all voxels)."""
    rows = []

    def add(model, layer, roi, e):
        rows.append([model, layer, roi, e["max"], e["mean"], e["n_voxels"]])

    for model, entry in h.items():
        add(model, "all", "all", entry["all_layers"])
        for lay, e in entry["layers"].items():
            add(model, lay, "all", e)
        for roi, r in entry["rois"].items():
            add(model, "all", roi, r["all_layers"])
            for lay, e in r["layers"].items():
                add(model, lay, roi, e)
    return rows
