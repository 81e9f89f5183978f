"""Stage 5, ``maps``: pycortex flatmaps or fsaverage surface maps, and the per-ROI selectivity figures."""

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..run_config import (
    RunConfig,
)
from .common import (
    DISPLAY_PX,
    FSAVERAGE_MAPS,
    SELECTIVITY_MAPS,
    _algonauts_dir,
    _backbone,
    _image_source,
    _sae_paths,
)

# the version of this stage's code: bump it when its outputs change meaning, so that a rerun after
# an upgrade recomputes this stage and those after it (the runner puts it into the stage's hash)
VERSION = 1


def _maps(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    for old in [*out.glob("*.png"), out / SELECTIVITY_MAPS, out / FSAVERAGE_MAPS]:  # nothing stale
        old.unlink(missing_ok=True)
    if c.brain.kind == "algonauts":
        maps, notes = _fsaverage_maps(c, root, out, log)
    else:
        maps, notes = _flatmaps(c, root, out, log), []
    selectivity = _selectivity_figures(c, root, out, log) if c.maps.selectivity_figures else {}
    summary = {"maps": maps, "selectivity": selectivity, "notes": notes}
    (out / "maps.json").write_text(json.dumps(summary, indent=1))
    written = [f for f in (SELECTIVITY_MAPS, FSAVERAGE_MAPS) if (out / f).is_file()]
    return ["maps.json", *maps, *(f for f in selectivity.values() if f), *written]


@dataclasses.dataclass
class MapSpec:
    """One cortical map: a value per voxel (or vertex) and how to colour it."""

    name: str  # the PNG's stem
    values: np.ndarray  # [V]
    title: str
    cmap: str
    label: str
    vmin: float | None = None
    vmax: float | None = None


def _z_over_images(acts: np.ndarray, i: int) -> np.ndarray:
    """Image ``i``'s dictionary activations as z-scores over the images (0 where a voxel is constant)."""
    mu, sd = acts.mean(0), acts.std(0)
    return np.where(sd > 0, (acts[i] - mu) / np.where(sd > 0, sd, 1), 0.0)


def _map_specs(c: RunConfig, root: Path, log) -> list[MapSpec]:
    """Best layer, max r and ``maps.images``' dictionary activations, per voxel: what every map draws."""
    from ..dictionary import VoxelDictionary

    with np.load(root / "analysis" / "per_voxel.npz", allow_pickle=False) as f:
        best, best_mean, max_r = f["best_layer_max"], f["best_layer_mean"], f["max_r"]
        density = f["latent_density"]
    sae = VoxelDictionary.load(root / "dictionary" / "sae_dictionary.npz")
    layers = list(sae.layers)
    lo, hi = min(layers), max(layers)
    specs = [
        MapSpec("best_layer", best, "best layer (max rule)", "viridis", "layer", lo, hi),
        MapSpec("best_layer_mean", best_mean, "best layer (mean rule)", "viridis", "layer", lo, hi),
        MapSpec("max_r", max_r, "max r (voxel dictionary)", "magma", "Pearson r"),
        # the latent -> voxel density, on a log scale: a few voxels collect many latents
        MapSpec("latent_density", np.log10(1 + density), "latent -> voxel: latents whose best voxel it is "
                "(all layers)", "inferno", "log10(1 + latents)", 0.0,
                max(1.0, float(np.log10(1 + density.max())))),
    ]  # fmt: skip
    acts = sae.activations.numpy()
    for i in c.maps.images:
        if i >= acts.shape[0]:
            log(f"  maps.images: image {i} out of range ({acts.shape[0]} images), skipped")
            continue
        title = f"dictionary activation, image {i}"
        specs.append(MapSpec(f"activation_image_{i:04d}", _z_over_images(acts, i), title, "RdBu_r",
                             "z over images", -3, 3))  # fmt: skip
    return specs


def _flatmaps(c: RunConfig, root: Path, out: Path, log) -> list[str]:
    """The maps on the subject's pycortex flatmap (volume data), with the subject's ROIs outlined."""
    from ..maps import flatmap_png

    if not c.maps.enabled or c.maps.subject is None:
        log("  flatmaps disabled (maps.enabled false or no maps.subject)")
        return []
    with np.load(root / "brain" / "responses.npz", allow_pickle=False) as f:
        vox, shape = f["voxels_full"], tuple(int(s) for s in f["volume_shape"])
        roi, names = f["roi"], [str(r) for r in f["roi_names"]]
    rois = {r: roi == r for r in names if (roi == r).any()}
    made = []
    for m in _map_specs(c, root, log):
        path = flatmap_png(m.values, vox, shape, out / f"{m.name}.png", m.title, subject=c.maps.subject,
                           xfm=c.maps.xfm, cmap=m.cmap, vmin=m.vmin, vmax=m.vmax, label=m.label,
                           rois=rois)  # fmt: skip
        made.append(path.name)
        log(f"  map {path.name}")
    return made


def _fsaverage_masks_or_note(c: RunConfig, n_challenge: int, log) -> tuple[tuple | None, list[str]]:
    """The subject's challenge-space masks over fsaverage, or None and the note that says why not (a
    missing or malformed ``all-vertices_fsaverage_space.npy``): the run goes on without surface maps."""
    from ..brain import BrainDataError
    from ..brain.algonauts import read_fsaverage_masks, scatter_to_fsaverage

    try:
        masks = read_fsaverage_masks(_algonauts_dir(c))
        scatter_to_fsaverage(np.zeros(n_challenge), *masks)  # the masks must select the responses' columns
    except BrainDataError as err:
        log(f"  fsaverage maps skipped: {err}")
        return None, [f"No fsaverage maps: {err}"]
    return masks, []


def _fsaverage_maps(c: RunConfig, root: Path, out: Path, log) -> tuple[list[str], list[str]]:
    """The maps on the inflated fsaverage surface (Algonauts 2023), with the ROIs outlined, and notes.

    Values of the kept vertices go back into the challenge space (NaN elsewhere), then onto fsaverage's
    163,842 vertices per hemisphere (NaN off the challenge space), which ``fsaverage_png`` draws on
    fsaverage5; the vectors drawn are kept in ``fsaverage_maps.npz`` (``<map>_lh``, ``<map>_rh``)."""
    from ..brain.algonauts import scatter_to_fsaverage
    from ..surface import fsaverage_png

    if not c.maps.enabled:
        log("  fsaverage maps disabled (maps.enabled false)")
        return [], []
    with np.load(root / "brain" / "responses.npz", allow_pickle=False) as f:
        vertices, roi_masks, roi_names = f["vertices"], f["roi_masks"], [str(r) for r in f["roi_names"]]
    masks, notes = _fsaverage_masks_or_note(c, roi_masks.shape[1], log)
    if masks is None:
        return [], notes
    in_rois = zip(roi_names, roi_masks, strict=True)
    outlines = {r: scatter_to_fsaverage(m, *masks) for r, m in in_rois if m.any()}
    made, drawn = [], {}
    for m in _map_specs(c, root, log):
        challenge = np.full(roi_masks.shape[1], np.nan, np.float32)
        challenge[vertices] = m.values
        lh, rh = scatter_to_fsaverage(challenge, *masks)
        path = fsaverage_png(lh, rh, out / f"fsaverage_{m.name}.png", title=m.title, cmap=m.cmap, vmin=m.vmin,
                             vmax=m.vmax, label=m.label, views=c.maps.views, rois=outlines)  # fmt: skip
        drawn[f"{m.name}_lh"], drawn[f"{m.name}_rh"] = lh, rh
        made.append(path.name)
        log(f"  map {path.name}")
    np.savez_compressed(out / FSAVERAGE_MAPS, **drawn)
    return made, notes


def _file_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _selectivity_requests(selectivity: dict) -> list[tuple[int, int, int]]:
    """Every (layer, latent, image) drawn in some ROI's figure, once."""
    return sorted(
        {
            (e["layer"], e["latent"], i)
            for entries in selectivity.values()
            for e in entries
            for i in e["top_images"]
        }
    )


def _run_saes(c: RunConfig, root: Path, layers: list[int]) -> dict:
    """The SAEs the activations stage used: the configured checkpoints or the ones it trained."""
    from ..checkpoint import load_sae

    paths = _sae_paths(c, layers) or {
        lay: root / "activations" / "saes" / f"layer_{lay:02d}.safetensors" for lay in layers
    }
    return {lay: load_sae(p) for lay, p in paths.items()}


def _check_patch_maps(selectivity: dict, maps: dict, log) -> None:
    """A patch map's mean is the per-image code the analysis ranked by: if they differ, the backbone,
    SAEs or images are not the ones the activations stage used (say so rather than draw silently)."""
    worst = 0.0
    for entries in selectivity.values():
        for e in entries:
            for image, stored in zip(e["top_images"], e["top_activations"], strict=True):
                got = float(maps[(e["layer"], e["latent"], image)].mean())
                worst = max(worst, abs(got - stored) / (1e-3 + abs(stored)))
    if worst > 1e-3:
        log(
            f"  warning: patch maps do not reproduce the stored activations (relative difference "
            f"{worst:.2g}): the backbone, SAEs or images differ from the activations stage's"
        )


def _activity_note(n_active: int) -> str:
    if n_active == 0:
        return "silent on every image"
    return f"active on {n_active} image{'s' if n_active > 1 else ''} only"


def _selectivity_rows(entries: list[dict], shown: dict, maps: dict) -> list:
    """Figure rows. A sparse latent may fire on fewer images than its top-image count: the images where
    it is silent are left out (a "top image" it does not fire on would mislead) and the title says so."""
    from ..figures import LatentRow

    rows = []
    for e in entries:
        active = [i for i, a in zip(e["top_images"], e["top_activations"], strict=True) if a > 0]
        ids = active or list(e["top_images"])
        note = "" if len(active) == len(e["top_images"]) else _activity_note(len(active))
        patch_maps = [maps[(e["layer"], e["latent"], i)] for i in ids]
        rows.append(
            LatentRow(e["layer"], e["latent"], e["mean_r"], ids, [shown[i] for i in ids], patch_maps, note)
        )
    return rows


def _selectivity_arrays(key: str, entries: list[dict], maps: dict) -> dict[str, np.ndarray]:
    """Every top image's patch map (silent ones included) for ``selectivity_maps.npz``. Maps on a coarser
    grid than the ROI's finest (the later stages of a multi-stage spiking backbone) are repeated onto it,
    each token over the cells it covers, which keeps every map's mean."""
    grids = [[maps[(e["layer"], e["latent"], i)] for i in e["top_images"]] for e in entries]
    rows, cols = max(m.shape[0] for g in grids for m in g), max(m.shape[1] for g in grids for m in g)
    grids = [[m[np.arange(rows) * m.shape[0] // rows][:, np.arange(cols) * m.shape[1] // cols] for m in g]
             for g in grids]  # fmt: skip
    return {
        f"maps_{key}": np.asarray(grids, np.float32),
        f"images_{key}": np.asarray([e["top_images"] for e in entries]),
    }


def _selectivity_figures(c: RunConfig, root: Path, out: Path, log) -> dict[str, str | None]:
    """Per ROI ``selectivity_<ROI>.png`` (None: an ROI without voxels) and ``selectivity_maps.npz`` with
    the patch maps drawn (``maps_<ROI>`` ``[latents, images, rows, cols]``, ``images_<ROI>``)."""
    from ..analysis.selectivity import latent_patch_maps
    from ..figures import display_image, save_figure, selectivity_figure

    numbers = json.loads((root / "analysis" / "numbers.json").read_text())
    selectivity = numbers["selectivity"]
    for roi in (r for r, entries in selectivity.items() if not entries):
        log(f"  selectivity: ROI {roi} has no voxels, so no top latents and no figure")
    requests = _selectivity_requests(selectivity)
    if not requests:
        return dict.fromkeys(selectivity)
    bb, _ = _backbone(c)  # its random-weights warning was logged by the activations stage
    source = _image_source(c)
    if len(source) != numbers["n_images"]:
        raise RuntimeError(
            f"the image source now has {len(source)} images; the run used {numbers['n_images']}"
        )
    layers = sorted({lay for lay, _, _ in requests})
    images = sorted({i for _, _, i in requests})
    log(f"  selectivity: patch tokens of {len(images)} top images, layers {layers}")
    # at most 16 images a batch: full-size codes are 16 x 196 tokens x 12,288 latents = 150 MB per layer
    batch_size = min(c.images.batch_size, 16)
    maps = latent_patch_maps(bb, _run_saes(c, root, layers), source, requests, batch_size=batch_size)
    _check_patch_maps(selectivity, maps, log)
    scale = max(1.0, DISPLAY_PX / min(bb.img_size))
    crop = {k: bb.preprocessing[k] for k in ("crop_pct", "crop_mode")}  # the region the backbone sees
    size = tuple(round(s * scale) for s in bb.img_size)
    shown = {i: display_image(source[i], size, **crop) for i in images}
    weights = " (RANDOM weights)" if c.backbone.checkpoint is None else ""
    subtitle = f"{bb.name} at {bb.img_size[0]} px{weights}; overlay: the latent's activation per patch"
    figures: dict[str, str | None] = {}
    arrays: dict[str, np.ndarray] = {}
    for roi, entries in selectivity.items():
        if not entries:
            figures[roi] = None
            continue
        rows = _selectivity_rows(entries, shown, maps)
        fig = selectivity_figure(roi, rows, subtitle, n_voxels=numbers["roi_voxels"][roi])
        figures[roi] = save_figure(fig, out / f"selectivity_{_file_safe(roi)}.png").name
        arrays.update(_selectivity_arrays(_file_safe(roi), entries, maps))
        log(f"  figure {figures[roi]}")
    np.savez(out / SELECTIVITY_MAPS, **arrays)
    return figures
