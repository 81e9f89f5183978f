"""Stage 4, ``analysis``: the headline, RSA, the layer hierarchy, the latent -> voxel mapping, the
encoding baseline, the synthetic recovery."""

import json
from pathlib import Path

import numpy as np
import torch

from ..run_config import (
    RunConfig,
)
from .common import LATENT_COUNTS, RSA_HEATMAPS, SIMILARITY_INPUTS, _fmt, _load_layers, _write_csv

# the version of this stage's code: bump it when its outputs change meaning, so that a rerun after
# an upgrade recomputes this stage and those after it (the runner puts it into the stage's hash)
VERSION = 1


def _no_ceiling_note(c: RunConfig) -> str:
    why = (
        "Algonauts 2023's training split holds one averaged response per image and no ncsnr"
        if c.brain.kind == "algonauts"
        else "no brain.nsd.ncsnr given"
    )
    return f"No noise ceiling ({why}): R^2 over the noise ceiling is not available."


def _algonauts_unavailable() -> list[str]:
    """What the report leaves out for Algonauts 2023, and why."""
    return [
        "Noise ceiling: the training split gives one response per image, its repeats already averaged, and "
        "no ncsnr; so no R^2 over the noise ceiling for the encoding baseline, and no split by ncsnr.",
        "Recovery of planted latents: only the synthetic subject has known (layer, latent) pairs.",
    ]


def _median_order_ok(medians: dict[str, float], planted: dict[str, int]) -> bool:
    """Whether, for every pair of ROIs planted at layers a < b, median best layer(a) <= median(b)."""
    names = list(medians)
    return all(
        medians[x] <= medians[y] for x in names for y in names if planted[x] < planted[y]
    )  # fmt: skip


def _analysis(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    from ..analysis import (
        best_layer,
        headline,
        latent_mapping,
        latents_per_roi,
        layer_scores,
        load_similarity_stats,
        ridge_encoding,
        roi_layer_counts,
        roi_selectivity,
        roi_selectivity_per_layer,
        rsa,
    )
    from ..analysis.similarity_stats import HEADLINE_HEADER, headline_rows
    from ..brain import noise_ceiling
    from ..dictionary import VoxelDictionary
    from ..figures import latent_count_figure, save_figure

    a = c.analysis
    with np.load(root / "brain" / "responses.npz", allow_pickle=False) as f:
        brain = {k: f[k] for k in f.files}
    responses = brain["responses"].astype(np.float64)
    roi = brain["roi"]
    rois = [str(r) for r in brain["roi_names"]]
    codes = _load_layers(root / "activations" / "sae_codes.npz")
    layers = sorted(codes)
    sae = VoxelDictionary.load(root / "dictionary" / "sae_dictionary.npz")
    raw = VoxelDictionary.load(root / "dictionary" / "neuron_dictionary.npz")
    sims = {m: load_similarity_stats(root / "dictionary" / f"similarity_{m}.npz")
            for m, _, _ in SIMILARITY_INPUTS}  # fmt: skip
    numbers: dict = {"n_images": int(responses.shape[0]), "n_voxels": int(responses.shape[1]),
                     "layers": layers, "rois": rois}  # fmt: skip

    # RSA on voxels that have a match in both dictionaries and are not constant
    ok = (sae.latent.numpy() >= 0) & (raw.latent.numpy() >= 0) & (responses.std(0) > 0)
    ok &= (sae.activations.numpy().std(0) > 0) & (raw.activations.numpy().std(0) > 0)
    idx = np.flatnonzero(ok)
    rng = np.random.default_rng(a.seed)
    if a.rsa_max_voxels is not None and len(idx) > a.rsa_max_voxels:  # None: all voxels (the authors')
        idx = np.sort(rng.choice(idx, a.rsa_max_voxels, replace=False))
    numbers["rsa"] = {"n_voxels": len(idx), "permutations": a.rsa_permutations}
    for name, d in (("sae_dictionary", sae), ("neuron_baseline", raw)):
        res = rsa(responses[:, idx], d.activations.numpy()[:, idx], a.rsa_permutations, a.seed)
        numbers["rsa"][name] = {"rho": res.rho, "p_value": res.p_value}
        log(f"  RSA {name}: rho {res.rho:.3f}, p {res.p_value:.4f}")
    (out / RSA_HEATMAPS).unlink(missing_ok=True)  # none stale from an earlier run
    if len(idx):
        _rsa_heatmaps(out / RSA_HEATMAPS, responses[:, idx], sae, raw, idx, roi[idx], rois, numbers["rsa"])
        log(f"  RSA heat maps {RSA_HEATMAPS}")

    # hierarchy
    resp_t = torch.from_numpy(responses)
    hier: dict = {}
    per_voxel = {}
    for rule in ("max", "mean"):
        scores = layer_scores(sims["sae"], rule=rule)  # the dictionary stage's streamed statistics
        best = best_layer(scores, layers)
        counts = roi_layer_counts(best, roi, rois, layers)
        per_voxel[f"best_layer_{rule}"], per_voxel[f"score_{rule}"] = best, scores.max(0)
        hier[rule] = {
            "roi_layer_counts": {r: counts[i].tolist() for i, r in enumerate(rois)},
            "median_best_layer": {r: float(np.median(best[roi == r])) for r in rois},
        }
        _write_csv(out / f"roi_layer_counts_{rule}.csv", ["roi", *[f"layer_{lay}" for lay in layers]],
                   [[r, *counts[i].tolist()] for i, r in enumerate(rois)])  # fmt: skip
    lpr = latents_per_roi(sae.layer.numpy(), sae.latent.numpy(), roi, rois, layers)
    hier["latents_per_roi"] = {r: lpr[i].tolist() for i, r in enumerate(rois)}
    _write_csv(out / "latents_per_roi.csv", ["roi", *[f"layer_{lay}" for lay in layers]],
               [[r, *lpr[i].tolist()] for i, r in enumerate(rois)])  # fmt: skip
    dict_layer = sae.layer.numpy()
    hier["dictionary_median_layer"] = {
        r: float(np.median(dict_layer[(roi == r) & (dict_layer >= 0)])) for r in rois
    }  # fmt: skip
    numbers["hierarchy"] = hier

    # the paper's headline (max and mean over voxels of the best r: SAE latents vs raw neurons) and the
    # authors' latent -> voxel mapping (each latent's best voxel: counts per ROI and layer, density per voxel)
    numbers["headline"] = headline(sims, roi, rois, n_images=responses.shape[0])
    _write_csv(out / "headline.csv", HEADLINE_HEADER, headline_rows(numbers["headline"]))
    s_all, n_all = (numbers["headline"][m]["all_layers"] for m in ("sae", "neurons"))
    log(f"  headline: SAE latents max r {_fmt(s_all['max'])}, mean {_fmt(s_all['mean'])}; "
        f"raw neurons max {_fmt(n_all['max'])}, mean {_fmt(n_all['mean'])}")  # fmt: skip
    mapping = latent_mapping(sims["sae"], roi, rois)
    numbers["latent_mapping"] = mapping.numbers()
    _write_csv(out / "latent_roi_layer_counts.csv", ["roi", *[f"layer_{lay}" for lay in layers]],
               [[r, *mapping.roi_layer_counts[i].tolist()] for i, r in enumerate(rois)]
               + [["(outside the ROIs)", *mapping.outside.tolist()],
                  ["(no best voxel)", *mapping.unassigned.tolist()]])  # fmt: skip
    save_figure(latent_count_figure(mapping), out / LATENT_COUNTS, dpi=120)
    np.savez(out / "per_voxel.npz", max_r=sae.r.numpy(), latent_density=mapping.density.sum(0),
             latent_density_layers=mapping.density, layers=np.asarray(layers), **per_voxel)  # fmt: skip

    # ROI-consistent selectivity: each ROI's top latents by mean r over its voxels, with their top images
    sel = roi_selectivity(codes, resp_t, roi, rois, top_latents=a.selectivity_latents,
                          top_images=a.selectivity_images)  # fmt: skip
    numbers["selectivity"] = {
        r: [{"layer": e.layer, "latent": e.latent, "mean_r": e.mean_r, "top_images": e.top_images,
             "top_activations": e.top_activations} for e in entries]
        for r, entries in sel.items()
    }  # fmt: skip
    numbers["roi_voxels"] = {r: int((roi == r).sum()) for r in rois}
    (out / "selectivity_per_layer.csv").unlink(missing_ok=True)  # none stale from an earlier run
    if a.selectivity_per_layer:  # the authors' ranking: each layer's own top latents per ROI
        ranked = roi_selectivity_per_layer(codes, resp_t, roi, rois, top_latents=a.selectivity_per_layer)
        numbers["selectivity_per_layer"] = {
            r: {str(lay): [{"latent": u, "mean_r": m} for u, m in entries]
                for lay, entries in by_layer.items()}
            for r, by_layer in ranked.items()
        }  # fmt: skip
        _write_csv(out / "selectivity_per_layer.csv", ["roi", "layer", "rank", "latent", "mean_r"],
                   [[r, lay, i, u, f"{m:.4f}"] for r, by_layer in ranked.items()
                    for lay, entries in by_layer.items() for i, (u, m) in enumerate(entries)])  # fmt: skip

    # the encoding baseline: ridge from the final embedding
    with np.load(root / "activations" / "final_embedding.npz", allow_pickle=False) as f:
        feats = f["cls"].astype(np.float64)
    n = feats.shape[0]
    perm = rng.permutation(n)
    n_test = max(3, round(a.test_fraction * n))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    ncsnr = brain["ncsnr"]
    ceiling = (
        None if np.isnan(ncsnr).all() else noise_ceiling(ncsnr, float(np.mean(brain["n_repeats"][test])))
    )
    enc = ridge_encoding(feats[train], responses[train], feats[test], responses[test], ceiling)
    numbers["encoding"] = {
        "n_train": len(train), "n_test": len(test),
        "median_r2": float(np.nanmedian(enc.r2)), "mean_r2": float(np.nanmean(enc.r2)),
        "median_r2_over_ceiling": (None if enc.r2_over_ceiling is None
                                   else float(np.nanmedian(enc.r2_over_ceiling))),
        "median_noise_ceiling_pct": None if ceiling is None else float(np.nanmedian(ceiling)),
        "noise_ceiling_note": None if ceiling is not None else _no_ceiling_note(c),
        "per_roi_median_r2": {r: float(np.nanmedian(enc.r2[roi == r])) for r in rois},
    }  # fmt: skip
    if c.brain.kind == "algonauts":
        numbers["unavailable"] = _algonauts_unavailable()
    log(f"  ridge encoding: median held-out R^2 {numbers['encoding']['median_r2']:.3f}")

    # the synthetic subject: recovery of the planted (layer, latent) and of the planted layer order
    if "planted_layer" in brain:
        pl_, pt = brain["planted_layer"], brain["planted_latent"]
        hit = (dict_layer == pl_) & (sae.latent.numpy() == pt)
        planted = {r: int(pl_[roi == r][0]) for r in rois}
        medians = hier["dictionary_median_layer"]
        strong = ncsnr > 0.5
        numbers["synthetic"] = {
            "recovered_fraction": float(hit.mean()),
            "chance_fraction": 1 / float(brain["n_latents_total"]),
            "recovered_fraction_ncsnr_gt_0.5": float(hit[strong].mean()) if strong.any() else None,
            "layer_recovered_fraction": float((dict_layer == pl_).mean()),
            "per_roi_recovered": {r: float(hit[roi == r].mean()) for r in rois},
            "planted_layer": planted,
            "median_best_layer": medians,
            "median_follows_planted_order": _median_order_ok(medians, planted),
        }  # fmt: skip
        log(f"  synthetic recovery: {hit.mean():.3f} of voxels; per-ROI order "
            f"{'follows' if numbers['synthetic']['median_follows_planted_order'] else 'does NOT follow'} "
            "the planted one")  # fmt: skip
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1))
    return [p.name for p in out.iterdir() if p.is_file() and p.name != "manifest.json"]


def _rsa_heatmaps(path: Path, brain: np.ndarray, sae, raw, idx: np.ndarray, roi: np.ndarray,
                  rois: list[str], numbers: dict) -> None:  # fmt: skip
    """The brain's, the SAE dictionary's and the raw-neuron baseline's voxel x voxel correlation matrices
    over the RSA's voxels (``idx``), side by side and ordered by ROI."""
    from ..figures import RSAPanel, rsa_heatmap_figure, save_figure

    def model(title: str, d, key: str) -> RSAPanel:
        return RSAPanel(title, d.activations.numpy()[:, idx], numbers[key]["rho"], numbers[key]["p_value"])

    panels = [RSAPanel("brain responses", brain), model("SAE voxel dictionary", sae, "sae_dictionary"),
              model("raw-neuron baseline", raw, "neuron_baseline")]  # fmt: skip
    save_figure(rsa_heatmap_figure(panels, roi, rois), path, dpi=120)
