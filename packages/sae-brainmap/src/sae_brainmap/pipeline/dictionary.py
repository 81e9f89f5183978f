"""Stage 3, ``dictionary``: the streamed latent x voxel similarities and the voxel dictionaries."""

from pathlib import Path

import numpy as np
import torch

from ..run_config import (
    RunConfig,
)
from .common import SIMILARITY_INPUTS, _load_layers, _write_csv

# the version of this stage's code: bump it when its outputs change meaning, so that a rerun after
# an upgrade recomputes this stage and those after it (the runner puts it into the stage's hash)
VERSION = 1


def _dictionary(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    from ..analysis.similarity_stats import save_similarity_stats, similarity_stats
    from ..dictionary import build_voxel_dictionary

    with np.load(root / "brain" / "responses.npz", allow_pickle=False) as f:
        responses, roi = torch.from_numpy(f["responses"]).float(), f["roi"]
    d = c.dictionary
    kw = {"centered": d.centered, "one_to_one": d.one_to_one, "candidates": d.candidates}
    built = {}
    for model, codes, name in SIMILARITY_INPUTS:
        acts = _load_layers(root / "activations" / codes)
        # One streamed pass over each layer's [latents, voxels] similarities: every voxel's best latent (the
        # dictionary) and mean r (the mean rule), every latent's best voxel (the latent -> voxel mapping).
        stats = similarity_stats(acts, responses, centered=d.centered)
        save_similarity_stats(out / f"similarity_{model}.npz", stats)
        built[model] = build_voxel_dictionary(acts, responses, **kw, similarity=stats)
        built[model].save(out / name)
    sae, raw = built["sae"], built["neurons"]
    log(f"  {sae.n_voxels} voxels: median r SAE latents {sae.r.median():.3f}, "
        f"residual dims {raw.r.median():.3f}")  # fmt: skip
    rows = [[v, roi[v], int(sae.layer[v]), int(sae.latent[v]), f"{float(sae.r[v]):.4f}", int(raw.layer[v]),
             int(raw.latent[v]), f"{float(raw.r[v]):.4f}"] for v in range(sae.n_voxels)]  # fmt: skip
    header = ["voxel", "roi", "layer", "latent", "r", "neuron_layer", "neuron", "neuron_r"]
    _write_csv(out / "dictionary.csv", header, rows)
    stats = [f"similarity_{model}.npz" for model, _, _ in SIMILARITY_INPUTS]
    return ["sae_dictionary.npz", "neuron_dictionary.npz", "dictionary.csv", *stats]
