"""``report.md``'s sections for the paper's own numbers: the headline (SAE latents vs raw neurons), the
latent -> voxel mapping and the per-layer selectivity ranking. Each takes ``analysis/numbers.json`` (as
a dict) and returns markdown lines; a section whose numbers are absent gives no lines."""


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def _pair(e: dict) -> str:
    return f"{_fmt(e['max'])} | {_fmt(e['mean'])}"


def headline_lines(numbers: dict) -> list[str]:
    """Max and mean over voxels of each voxel's best r, SAE latents beside raw neurons: per layer (all
    voxels), per ROI (all layers), and the mean per ROI and layer."""
    h = numbers.get("headline")
    if not h:
        return []
    sae, raw = h["sae"], h["neurons"]
    n_vox = sae["all_layers"]["n_voxels"]
    L = ["## Headline: SAE latents vs raw neurons (max and mean similarity over voxels)", "",
         f"For each of the {n_vox} voxels, its best Pearson r over images with a latent: **SAE** = the layer "
         "SAEs' latents (per-image mean of the patch tokens' codes), **neurons** = the raw residual-stream "
         "dimensions (per-image mean of the patch tokens); then the maximum and the mean of that best r over "
         "the voxels. Row **all**: each voxel's best over every layer, the authors' \"SAEs / Neurons max "
         "and mean similarity\" printout (the paper's \"maximum similarity up to 0.76\" is its SAE max); a "
         "layer's row: the best latent within that layer.", ""]  # fmt: skip
    chance_s, chance_r = sae.get("chance_best_r"), raw.get("chance_best_r")
    if chance_s and chance_r:
        L += [f"Noise alone gives a voxel a best r of about {_fmt(chance_s['all_layers'])} (SAE, all "
              f"layers) and {_fmt(chance_r['all_layers'])} (neurons): the expected largest of that many "
              "independent r over these images (columns *chance*; correlated latents reach less). More "
              "candidates lift a voxel's best r by chance alone, so read each model's mean against its own "
              "chance level.", ""]  # fmt: skip
    L += ["| layer | SAE max | SAE mean | neurons max | neurons mean | chance SAE | chance neurons |",
          "|---|---|---|---|---|---|---|"]  # fmt: skip

    def chance(c, key):
        if not c:
            return "n/a"
        return _fmt(c["all_layers"] if key is None else c["layers"].get(key))

    a, b = sae["all_layers"], raw["all_layers"]
    L.append(f"| **all** | **{_fmt(a['max'])}** | {_fmt(a['mean'])} | {_pair(b)} | "
             f"{chance(chance_s, None)} | {chance(chance_r, None)} |")  # fmt: skip
    for lay in sae["layers"]:
        L.append(f"| {lay} | {_pair(sae['layers'][lay])} | {_pair(raw['layers'][lay])} | "
                 f"{chance(chance_s, lay)} | {chance(chance_r, lay)} |")  # fmt: skip
    rois = numbers["rois"]
    L += ["", "Per ROI (each voxel's best over all layers):", "",
          "| ROI | voxels | SAE max | SAE mean | neurons max | neurons mean |",
          "|---|---|---|---|---|---|"]  # fmt: skip
    for q in rois:
        s, r = sae["rois"][q]["all_layers"], raw["rois"][q]["all_layers"]
        L.append(f"| {q} | {s['n_voxels']} | {_pair(s)} | {_pair(r)} |")
    layers = list(sae["layers"])
    L += ["", "Mean over each ROI's voxels of the best r within each layer, SAE / neurons:", "",
          "| ROI | " + " | ".join(f"L{lay}" for lay in layers) + " |",
          "|---" * (len(layers) + 1) + "|"]  # fmt: skip
    for q in rois:
        s, r = sae["rois"][q]["layers"], raw["rois"][q]["layers"]
        cells = [f"{_fmt(s[lay]['mean'])} / {_fmt(r[lay]['mean'])}" for lay in layers]
        L.append(f"| {q} | " + " | ".join(cells) + " |")
    L += ["", "All of it, maxima included, per model, layer and ROI: `analysis/headline.csv`.", ""]
    return L


def latent_mapping_lines(numbers: dict, figure: str | None) -> list[str]:
    """Latents per ROI and layer by their best voxel, the uniform expectation, and the bar plots."""
    m = numbers.get("latent_mapping")
    if not m:
        return []
    layers, rois = m["layers"], numbers["rois"]
    L = ["## Latent -> voxel mapping: each latent's best voxel", "",
         "The reverse of the voxel dictionary (the authors' mapping): for every SAE latent of every layer, "
         "the voxel where its r is highest. Latents per ROI and layer; *uniform*: what the same latents "
         "would give if they landed on voxels at random (the ROI's share of the voxels).", "",
         "| ROI | voxels | " + " | ".join(f"L{lay}" for lay in layers) + " | all | uniform |",
         "|---" * (len(layers) + 4) + "|"]  # fmt: skip
    for q in rois:
        counts = m["roi_layer_counts"][q]
        uniform = sum(m["uniform_expectation"][q])
        L.append(f"| {q} | {numbers['roi_voxels'][q]} | " + " | ".join(str(v) for v in counts)
                 + f" | {sum(counts)} | {uniform:.0f} |")  # fmt: skip
    if any(m["outside_rois"]):
        L.append("| (outside the ROIs) | | " + " | ".join(str(v) for v in m["outside_rois"])
                 + f" | {sum(m['outside_rois'])} | |")  # fmt: skip
    L.append("| (no best voxel: constant latent) | | " + " | ".join(str(v) for v in m["no_best_voxel"])
             + f" | {sum(m['no_best_voxel'])} | |")  # fmt: skip
    L += ["", f"{m['voxels_with_latents']} of {numbers['n_voxels']} voxels are some latent's best voxel, "
          f"at most {m['max_latents_per_voxel']} latents on one voxel; the density per voxel is drawn on the "
          "cortex in the maps section (`latent_density`).", ""]  # fmt: skip
    if figure:
        L += [f"![latent -> voxel: latents per ROI and layer](analysis/{figure})", ""]
    return L


def selectivity_per_layer_lines(numbers: dict) -> list[str]:
    """Per ROI and layer, that layer's top latent by mean r over the ROI's voxels (the authors' ranking)."""
    sel = numbers.get("selectivity_per_layer")
    if not sel:
        return []
    layers = [str(lay) for lay in numbers["layers"]]
    k = max((len(e) for by_layer in sel.values() for e in by_layer.values()), default=0)
    L = ["", "## ROI-consistent selectivity per layer (the authors' ranking)", "",
         f"Each layer ranked on its own: per ROI, the layer's top latent by mean r over the ROI's voxels, as "
         f"latent (mean r). The top {k} per layer: `analysis/selectivity_per_layer.csv`.", "",
         "| ROI | " + " | ".join(f"L{lay}" for lay in layers) + " |",
         "|---" * (len(layers) + 1) + "|"]  # fmt: skip
    for q in numbers["rois"]:
        by_layer = sel.get(q, {})
        top = [by_layer[lay][0] if by_layer.get(lay) else None for lay in layers]
        cells = [f"{e['latent']} ({e['mean_r']:.3f})" if e else "-" for e in top]
        L.append(f"| {q} | " + " | ".join(cells) + " |")
    return L
