"""The voxel dictionary: for every voxel, the (layer, latent) whose activations best follow its responses.

The paper's rule is an independent argmax over every layer's latents (several voxels may share a
latent), computed layer by layer through :func:`~sae_brainmap.alignment.top_matches`, so that only
``O(V)`` running maxima and one layer's activations are touched at a time. ``one_to_one=True`` is the
optional extension: a maximum-total-r matching in which each latent serves at most one voxel.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .alignment import check_pair, top_matches


@dataclass
class VoxelDictionary:
    """Per voxel ``v``: ``layer[v]``, ``latent[v]`` (-1 where none: a constant voxel, or a voxel left out
    of a one-to-one matching), ``r[v]`` (its similarity, 0 where none) and ``activations[:, v]``, the
    matched latent's activations over the N images (the voxel's "dictionary activation")."""

    layer: Tensor  # [V] int64
    latent: Tensor  # [V] int64
    r: Tensor  # [V] float32
    activations: Tensor  # [N, V] float32
    layers: tuple[int, ...]  # the layers searched, in order
    centered: bool = True

    @property
    def n_voxels(self) -> int:
        return int(self.layer.shape[0])

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            layer=self.layer.numpy(),
            latent=self.latent.numpy(),
            r=self.r.numpy(),
            activations=self.activations.numpy(),
            layers=np.asarray(self.layers, dtype=np.int64),
            centered=np.asarray(self.centered),
        )

    @classmethod
    def load(cls, path: str | Path) -> "VoxelDictionary":
        with np.load(path, allow_pickle=False) as f:
            return cls(
                layer=torch.from_numpy(f["layer"]),
                latent=torch.from_numpy(f["latent"]),
                r=torch.from_numpy(f["r"]),
                activations=torch.from_numpy(f["activations"]),
                layers=tuple(int(i) for i in f["layers"]),
                centered=bool(f["centered"]),
            )


def _check_layers(layer_acts: dict[int, Tensor], responses: Tensor) -> list[int]:
    if not isinstance(layer_acts, dict) or not layer_acts:
        raise ValueError("layer_acts must be a non-empty dict {layer index: activations [N, U]}")
    for layer, acts in layer_acts.items():
        check_pair(acts, responses, what=f"layer_acts[{layer}]")
    return sorted(layer_acts)


def build_voxel_dictionary(
    layer_acts: dict[int, Tensor],
    responses: Tensor,
    *,
    centered: bool = True,
    one_to_one: bool = False,
    candidates: int = 16,
    chunk: int = 2048,
    similarity: dict | None = None,
) -> VoxelDictionary:
    """The voxel dictionary of ``responses`` ``[N, V]`` over ``layer_acts`` ``{layer: [N, U_layer]}``.

    Independent argmax (default): per voxel the (layer, latent) of highest r over all layers; ties go to
    the smaller layer, then the smaller latent. ``one_to_one``: ``scipy.optimize.linear_sum_assignment``
    maximising the total r, restricted to each voxel's ``candidates`` best latents per layer (exact when
    ``candidates`` >= the number of latents); voxels left without a latent get -1.

    ``similarity``: ``{layer: LayerSimilarity}`` of :func:`sae_brainmap.analysis.similarity_stats` over the
    same activations and responses (computed with the same ``centered``): the independent argmax then
    takes each layer's best latent per voxel from it instead of streaming the similarities again.
    """
    layers = _check_layers(layer_acts, responses)
    if one_to_one:
        layer, latent, r = _one_to_one(layer_acts, layers, responses, centered, candidates, chunk)
    elif similarity is not None:
        layer, latent, r = _from_similarity(similarity, layers, responses.shape[1])
    else:
        layer, latent, r = _independent(layer_acts, layers, responses, centered, chunk)
    return VoxelDictionary(
        layer=layer,
        latent=latent,
        r=r,
        activations=gather_activations(layer_acts, layer, latent),
        layers=tuple(layers),
        centered=centered,
    )


def _independent(layer_acts, layers, responses, centered, chunk):
    def per_layer():
        for lay in layers:
            vals, idx = top_matches(layer_acts[lay], responses, k=1, centered=centered, chunk=chunk)
            yield lay, vals[:, 0].cpu(), idx[:, 0].cpu()

    return _best_over_layers(per_layer(), responses.shape[1])


def _from_similarity(similarity: dict, layers: list[int], V: int):
    if sorted(similarity) != layers:
        raise ValueError(f"similarity covers layers {sorted(similarity)}, the activations {layers}")
    for lay in layers:
        if similarity[lay].voxel_max.shape != (V,):
            n = similarity[lay].voxel_max.shape[0]
            raise ValueError(f"similarity of layer {lay} covers {n} voxels, not {V}")
    per_layer = ((lay, similarity[lay].voxel_max.float(), similarity[lay].voxel_argmax) for lay in layers)
    return _best_over_layers(per_layer, V)


def _best_over_layers(per_layer, V: int):
    """Per voxel the best (layer, latent, r) over ``(layer, r [V], latent [V])`` in layer order."""
    best_r = torch.full((V,), float("-inf"))
    best_layer = torch.full((V,), -1, dtype=torch.int64)
    best_latent = torch.full((V,), -1, dtype=torch.int64)
    for lay, vals, idx in per_layer:
        better = (idx >= 0) & (vals > best_r)  # strictly: a tie keeps the earlier (smaller) layer
        best_r = torch.where(better, vals, best_r)
        best_layer = torch.where(better, lay, best_layer)
        best_latent = torch.where(better, idx, best_latent)
    return best_layer, best_latent, torch.where(best_layer >= 0, best_r, torch.zeros_like(best_r))


def _one_to_one(layer_acts, layers, responses, centered, candidates, chunk, max_cells: float = 2e8):
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    V = responses.shape[1]
    ids, vals, voxel = [], [], []
    offsets, offset = {}, 0
    for lay in layers:
        U = layer_acts[lay].shape[1]
        v, i = top_matches(layer_acts[lay], responses, k=min(candidates, U), centered=centered, chunk=chunk)
        ok = i >= 0
        ids.append((i + offset)[ok].cpu())
        vals.append(v[ok].cpu())
        voxel.append(torch.arange(V)[:, None].expand_as(i)[ok.cpu()])
        offsets[lay], offset = offset, offset + U
    ids, vals, voxel = torch.cat(ids), torch.cat(vals), torch.cat(voxel)
    cols, col_of = torch.unique(ids, return_inverse=True)
    if V * len(cols) > max_cells:
        raise ValueError(
            f"one-to-one assignment over {V} voxels x {len(cols)} candidate latents is too large for a "
            "dense cost matrix; lower `candidates` or match fewer voxels at a time"
        )
    # Pairs outside the candidates cost more than any real pair (r >= -1), so they are chosen only when
    # nothing else is left, and are dropped afterwards.
    cost = np.full((V, len(cols)), 3.0)
    cost[voxel.numpy(), col_of.numpy()] = -vals.double().numpy()
    rows, cs = linear_sum_assignment(cost)
    real = cost[rows, cs] < 3.0
    rows, cs = rows[real], cs[real]
    layer = torch.full((V,), -1, dtype=torch.int64)
    latent = torch.full((V,), -1, dtype=torch.int64)
    r = torch.zeros(V)
    starts = torch.tensor([offsets[lay] for lay in layers])
    g = cols[torch.from_numpy(cs)]
    pos = torch.searchsorted(starts, g, right=True) - 1
    layer[rows] = torch.tensor(layers)[pos]
    latent[rows] = g - starts[pos]
    r[rows] = torch.from_numpy(-cost[rows, cs]).float()
    return layer, latent, r


def gather_activations(layer_acts: dict[int, Tensor], layer: Tensor, latent: Tensor) -> Tensor:
    """``[N, V]``: column v = ``layer_acts[layer[v]][:, latent[v]]`` (zeros where ``layer[v]`` is -1)."""
    n = next(iter(layer_acts.values())).shape[0]
    out = torch.zeros(n, layer.shape[0], dtype=torch.float32)
    for lay, acts in layer_acts.items():
        cols = (layer == lay).nonzero().flatten()
        if len(cols):
            out[:, cols] = acts[:, latent[cols].to(acts.device)].float().cpu()
    return out
