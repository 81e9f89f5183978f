"""Stage 6, ``report``: ``report.md`` with the numbers and the figures."""

import json
from pathlib import Path

from ..run_config import (
    RunConfig,
)
from .common import LATENT_COUNTS, RSA_HEATMAPS, _fmt

# the version of this stage's code: bump it when its outputs change meaning, so that a rerun after
# an upgrade recomputes this stage and those after it (the runner puts it into the stage's hash)
VERSION = 1


def _selectivity_figure_links(figures: dict[str, str | None], rois: list[str]) -> list[str]:
    """Markdown for the selectivity figures, in ROI order (none when the figures are switched off)."""
    if not figures:
        return []
    lines = ["", "Each ROI's top latents (rows) on their top images, with the latent's patch-activation map "
             "laid over each image:", ""]  # fmt: skip
    for roi in rois:
        name = figures.get(roi)
        lines += [f"![{roi}: top latents and their top images](maps/{name})" if name else
                  f"*{roi}: no voxels, no figure.*", ""]  # fmt: skip
    return lines


def _rsa_heatmap_lines(root: Path) -> list[str]:
    """Markdown for the RSA heat maps (none when there were too few voxels to draw them)."""
    if not (root / "analysis" / RSA_HEATMAPS).is_file():
        return []
    return ["Voxel x voxel correlations over images, voxels ordered by ROI (the matrices the RSA compares):",
            "", f"![RSA: ROI-ordered voxel x voxel correlations](analysis/{RSA_HEATMAPS})", ""]  # fmt: skip


def _encoding_lines(e: dict, rois: list[str]) -> list[str]:
    ceiling = (
        f"; median R^2 / noise ceiling {_fmt(e['median_r2_over_ceiling'])} "
        f"(median ceiling {_fmt(e['median_noise_ceiling_pct'])}%)."
        if e.get("noise_ceiling_note") is None
        else f". {e['noise_ceiling_note']}"
    )
    lines = ["", "## Encoding baseline (ridge from the last layer's CLS; a spiking model's token mean)", "",
             f"{e['n_train']} training / {e['n_test']} held-out images: median R^2 {_fmt(e['median_r2'])}, "
             f"mean {_fmt(e['mean_r2'])}{ceiling}", "", "| ROI | median R^2 |", "|---|---|"]  # fmt: skip
    return lines + [f"| {q} | {_fmt(e['per_roi_median_r2'][q])} |" for q in rois]


def _map_lines(root: Path, maps: list[str], notes: list[str], kind: str) -> list[str]:
    """The maps section: each PNG (a dictionary activation with its stimulus), and the maps' notes."""
    if not maps and not notes:
        return []
    lines = ["", "## Maps", ""]
    if kind == "algonauts" and maps:
        lines += ["On the inflated fsaverage surface (nilearn's fsaverage5: the challenge-space vertices "
                  "among its 10,242 per hemisphere; grey: no data), ROIs outlined.", ""]  # fmt: skip
    lines += [f"*{note}*" for note in notes] + ([""] if notes else [])
    for m in maps:
        lines.append(f"![{m}](maps/{m})")
        stim = root / "activations" / f"stimulus_{m.split('_')[-1].split('.')[0]}.png"
        if "activation_image" in m and stim.is_file():
            lines.append(f"![stimulus](activations/{stim.name})")
        lines.append("")
    return lines


def _report(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    from ..report_sections import headline_lines, latent_mapping_lines, selectivity_per_layer_lines

    numbers = json.loads((root / "analysis" / "numbers.json").read_text())
    info = json.loads((root / "activations" / "info.json").read_text())
    maps_json = json.loads((root / "maps" / "maps.json").read_text())
    maps, selectivity_figures = maps_json["maps"], maps_json.get("selectivity", {})
    unit = "challenge-space vertices" if c.brain.kind == "algonauts" else "voxels"
    layers, rois = numbers["layers"], numbers["rois"]
    L: list[str] = ["# SAE-BrainMap run report", ""]
    L += [f"- backbone: `{info['backbone']}` at {info['img_size'][0]} px, layers {layers}"
          + (" — **random weights: results are not meaningful**" if info["random_backbone"] else ""),
          f"- images: {info['n_images']} ({c.images.source}); SAEs: "
          + ("trained here" if info["sae_trained_here"] else "loaded from checkpoints")
          + f" ({c.sae.kind}, {c.sae.n_latents} latents, k={c.sae.k})",
          f"- brain: {c.brain.kind}, {numbers['n_voxels']} {unit} in {len(rois)} ROIs", ""]  # fmt: skip
    if info["sae_metrics"]:
        L += ["## SAEs", "", "| layer | FVE | L0 | dead fraction |", "|---|---|---|---|"]
        L += [f"| {k} | {_fmt(m['fve'])} | {_fmt(m['l0'])} | {_fmt(m['dead_fraction'])} |"
              for k, m in info["sae_metrics"].items()]  # fmt: skip
        L.append("")
    L += headline_lines(numbers)
    if "synthetic" in numbers:
        s = numbers["synthetic"]
        L += ["## Synthetic subject: recovery of the planted latents", "",
              f"- planted (layer, latent) recovered for **{s['recovered_fraction']:.1%}** of voxels "
              f"({_fmt(s['recovered_fraction_ncsnr_gt_0.5'])} for ncsnr > 0.5; "
              f"chance {s['chance_fraction']:.1e}); "
              f"planted layer recovered for {s['layer_recovered_fraction']:.1%}",
              f"- per-ROI median best layer follows the planted order: "
              f"**{'yes' if s['median_follows_planted_order'] else 'no'}**", "",
              "| ROI | planted layer | median best layer | recovered |", "|---|---|---|---|"]  # fmt: skip
        L += [f"| {r} | {s['planted_layer'][r]} | {_fmt(s['median_best_layer'][r])} | "
              f"{s['per_roi_recovered'][r]:.1%} |" for r in rois]  # fmt: skip
        L.append("")
    r = numbers["rsa"]
    L += ["## RSA (voxel x voxel structure)", "",
          f"{r['n_voxels']} voxels, {r['permutations']} permutations (Mantel test).", "",
          "| model | Spearman rho | p |", "|---|---|---|",
          f"| SAE voxel dictionary | {_fmt(r['sae_dictionary']['rho'])} | "
          f"{_fmt(r['sae_dictionary']['p_value'])} |",
          f"| raw-neuron baseline | {_fmt(r['neuron_baseline']['rho'])} | "
          f"{_fmt(r['neuron_baseline']['p_value'])} |", ""]  # fmt: skip
    L += _rsa_heatmap_lines(root)
    h = numbers["hierarchy"]
    head = "| ROI | " + " | ".join(f"L{lay}" for lay in layers) + " |"
    sep = "|---" * (len(layers) + 1) + "|"
    for rule in ("max", "mean"):
        L += [f"## Best layer per voxel ({rule} rule): voxels per ROI and layer", "", head + " median |",
              sep + "---|"]  # fmt: skip
        L += [f"| {q} | " + " | ".join(str(v) for v in h[rule]["roi_layer_counts"][q])
              + f" | {_fmt(h[rule]['median_best_layer'][q])} |" for q in rois]  # fmt: skip
        L.append("")
    L += ["## Distinct dictionary latents per ROI and layer", "", head, sep]
    L += [f"| {q} | " + " | ".join(str(v) for v in h["latents_per_roi"][q]) + " |" for q in rois]
    counts_png = LATENT_COUNTS if (root / "analysis" / LATENT_COUNTS).is_file() else None
    L += ["", *latent_mapping_lines(numbers, counts_png)]
    L += ["", "## ROI-consistent selectivity: each ROI's top latents by mean r over its voxels", "",
          "| ROI | layer:latent | mean r | top images |", "|---|---|---|---|"]  # fmt: skip
    L += [f"| {q} | {e['layer']}:{e['latent']} | {_fmt(e['mean_r'])} | "
          + ", ".join(str(i) for i in e["top_images"]) + " |"
          for q in rois for e in numbers.get("selectivity", {}).get(q, [])]  # fmt: skip
    L += _selectivity_figure_links(selectivity_figures, rois)
    L += selectivity_per_layer_lines(numbers)
    L += _encoding_lines(numbers["encoding"], rois)
    L += _map_lines(root, maps, maps_json.get("notes", []), c.brain.kind)
    if numbers.get("unavailable"):
        L += ["", "## Not available for this data", ""] + [f"- {note}" for note in numbers["unavailable"]]
    L += ["", "Numbers: `analysis/numbers.json`, `analysis/*.csv`, `dictionary/dictionary.csv`.", ""]
    (root / "report.md").write_text("\n".join(L))
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1))
    return ["numbers.json", "../report.md"]
