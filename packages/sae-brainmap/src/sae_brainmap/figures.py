"""Figures: ROI selectivity (an ROI's top latents, each a row of its top images with the latent's
patch-activation map laid over them) and the RSA heat maps (voxel x voxel correlations, ordered by ROI).

Each image is shown as the ViT saw it (the same short-side resize and centre crop, without the
normalisation), so the patch grid lines up with the picture. The map is upsampled bilinearly to the
image and drawn with a colormap whose opacity grows with the activation: where the latent is silent the
photograph shows through. One colour scale per row (0 to the row's largest activation), with its
colorbar, so a latent's images compare with each other.

The RSA heat maps put the brain's ``[V, V]`` correlation matrix (over images) beside those of the models'
dictionary activations, voxels grouped by ROI (in the run's ROI order, voxels in no listed ROI last as
"other"), on one diverging scale [-1, 1]. Rendering is headless (a bare Agg canvas, no pyplot state).
"""

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PANEL_INCHES = 1.9  # one image panel
TITLE_CHARS_PER_INCH = 9  # titles wrap to the figure width (12 pt text)
OVERLAY_CMAP = "inferno"
MAX_ALPHA = 0.75  # opacity of the overlay at the row's largest activation
RSA_MAX_VOXELS = 500  # more would be finer than the heat map's pixels
RSA_CMAP = "RdBu_r"
OTHER_ROI = "other"  # voxels in no listed ROI


@dataclass
class LatentRow:
    """One figure row: a latent and its top images (uint8 ``[H, W, 3]``, as shown) with its ``[rows,
    cols]`` patch-activation map on each."""

    layer: int
    latent: int
    mean_r: float
    image_ids: list[int]
    images: list[np.ndarray]
    patch_maps: list[np.ndarray]
    note: str = ""  # appended to the row's title


def display_image(
    img: np.ndarray, size: tuple[int, int], crop_pct: float = 1.0, crop_mode: str = "center"
) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> uint8 ``[*size, 3]``: the region the model sees (its resize and centre
    crop: the backbone's ``crop_pct`` and ``crop_mode``), at ``size`` for display."""
    from .images import to_model_input

    x = to_model_input(img, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), crop_pct=crop_pct, crop_mode=crop_mode)
    return (x.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def upsample_patch_map(patch_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A ``[rows, cols]`` patch grid -> ``[*size]``, bilinear with pixel centres (align_corners=False)."""
    grid = torch.as_tensor(np.asarray(patch_map, np.float64))[None, None]
    return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay_cmap(name: str = OVERLAY_CMAP, max_alpha: float = MAX_ALPHA):
    """``name`` with opacity rising linearly from 0 (no activation) to ``max_alpha``."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    colours = colormaps[name](np.linspace(0, 1, 256))
    colours[:, 3] = np.linspace(0, max_alpha, 256)
    return ListedColormap(colours, name=f"{name}_alpha")


def _check_rows(roi: str, rows: list[LatentRow]) -> None:
    if not rows:
        raise ValueError(f"ROI {roi}: no latents to draw (an ROI without voxels has no top latents)")
    for row in rows:
        n = len(row.image_ids)
        if n == 0:
            raise ValueError(f"ROI {roi}: layer {row.layer} latent {row.latent} has no images to draw")
        if len(row.images) != n or len(row.patch_maps) != n:
            raise ValueError(
                f"ROI {roi}: layer {row.layer} latent {row.latent} has {n} image ids, {len(row.images)} "
                f"images and {len(row.patch_maps)} patch maps"
            )


def _draw_row(subfig, row: LatentRow, n_cols: int, cmap) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    top = max(float(np.max(m)) for m in row.patch_maps)
    norm = Normalize(0.0, top if top > 0 else 1.0)  # a silent latent: an empty overlay, not a 0/0 scale
    axes = subfig.subplots(1, n_cols, squeeze=False)[0]
    for ax, image_id, img, patch_map in zip(axes, row.image_ids, row.images, row.patch_maps, strict=False):
        ax.imshow(img)
        ax.imshow(upsample_patch_map(patch_map, img.shape[:2]), cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(
            f"image {image_id} · mean {float(np.mean(patch_map)):.2g}", fontsize=8
        )  # the ranked value
        ax.set_axis_off()
    for ax in axes[len(row.image_ids) :]:  # fewer images than columns: leave the slot blank
        ax.remove()
    bar = subfig.colorbar(
        ScalarMappable(norm, cmap=OVERLAY_CMAP), ax=list(axes[: len(row.image_ids)]),
        fraction=0.025, pad=0.01,
    )  # fmt: skip
    bar.set_label("activation", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    note = f" · {row.note}" if row.note else ""
    subfig.suptitle(f"layer {row.layer} · latent {row.latent} · mean r = {row.mean_r:.3f}{note}", fontsize=10)


def selectivity_figure(roi: str, rows: list[LatentRow], subtitle: str = "", n_voxels: int | None = None):
    """A matplotlib ``Figure``: a title, then one row per latent of its images with the overlay."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_rows(roi, rows)
    n_cols = max(len(r.image_ids) for r in rows)
    width = PANEL_INCHES * n_cols + 0.9
    voxels = f"its {n_voxels} voxels" if n_voxels is not None else "the ROI's voxels"
    title = f"{roi}: top {len(rows)} latent{'s' if len(rows) > 1 else ''} by mean r over {voxels}"
    title = "\n".join(
        textwrap.wrap(title, int(width * TITLE_CHARS_PER_INCH))
        + textwrap.wrap(subtitle, int(width * TITLE_CHARS_PER_INCH))
    )
    header = 0.2 * (title.count("\n") + 1) + 0.15
    fig = Figure(figsize=(width, (PANEL_INCHES + 0.35) * len(rows) + header), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=12)
    cmap = overlay_cmap()
    for subfig, row in zip(fig.subfigures(len(rows), 1, squeeze=False)[:, 0], rows, strict=True):
        _draw_row(subfig, row, n_cols, cmap)
    return fig


@dataclass
class RSAPanel:
    """One heat map: ``[N images, V voxels]`` data (the voxels in the run's order) and its title."""

    title: str
    data: np.ndarray
    rho: float | None = None  # Spearman rho / p of its RSA against the brain (None: the brain itself)
    p_value: float | None = None


def roi_voxel_order(roi: np.ndarray, roi_names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Voxel indices grouped by ROI in ``roi_names`` order (each ROI's voxels in their original order),
    voxels in none of them last, and each ordered voxel's ROI (``OTHER_ROI`` for those)."""
    labels = [str(r) if str(r) in roi_names else OTHER_ROI for r in roi]
    rank = {name: i for i, name in enumerate([*roi_names, OTHER_ROI])}
    order = np.asarray(sorted(range(len(labels)), key=lambda i: rank[labels[i]]), dtype=int)  # stable
    return order, [labels[i] for i in order]


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """``min(n, k)`` positions spread evenly over ``range(n)`` (deterministic, increasing)."""
    if n <= k:
        return np.arange(n)
    return np.round(np.linspace(0, n - 1, k)).astype(int)


def roi_blocks(labels: list[str]) -> list[tuple[str, int, int]]:
    """``(roi, start, stop)`` of each run of equal labels."""
    blocks: list[tuple[str, int, int]] = []
    for i, label in enumerate(labels):
        if blocks and blocks[-1][0] == label:
            blocks[-1] = (label, blocks[-1][1], i + 1)
        else:
            blocks.append((label, i, i + 1))
    return blocks


def _draw_heatmap(ax, corr: np.ndarray, blocks: list[tuple[str, int, int]], title: str):
    image = ax.imshow(corr, cmap=RSA_CMAP, vmin=-1, vmax=1, interpolation="nearest")
    for _, start, _ in blocks[1:]:  # thin lines between ROI blocks
        ax.axhline(start - 0.5, color="black", linewidth=0.5)
        ax.axvline(start - 0.5, color="black", linewidth=0.5)
    centres = [(start + stop - 1) / 2 for _, start, stop in blocks]
    names = [name for name, _, _ in blocks]
    ax.set_xticks(centres, names, rotation=90, fontsize=7)
    ax.set_yticks(centres, names, fontsize=7)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=10)
    return image


def _panel_title(panel: RSAPanel) -> str:
    if panel.rho is None:
        return panel.title
    return f"{panel.title}\nSpearman rho {panel.rho:.3f}, p {panel.p_value:.3g} vs brain"


def rsa_heatmap_figure(
    panels: list[RSAPanel], roi: np.ndarray, roi_names: list[str], max_voxels: int = RSA_MAX_VOXELS
):
    """A matplotlib ``Figure``: each panel's ``[V, V]`` correlation matrix over images, side by side,
    voxels ordered by ROI (``roi``: each voxel's ROI), at most ``max_voxels`` of them (evenly spaced in
    that order, which keeps every ROI's share)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_voxels = len(roi)
    for panel in panels:
        if panel.data.ndim != 2 or panel.data.shape[1] != n_voxels:
            raise ValueError(f"{panel.title}: data {panel.data.shape} is not [N images, {n_voxels} voxels]")
    order, labels = roi_voxel_order(roi, roi_names)
    keep = evenly_spaced(n_voxels, max_voxels)
    order, labels = order[keep], [labels[i] for i in keep]
    blocks = roi_blocks(labels)
    fig = Figure(figsize=(4.2 * len(panels) + 0.8, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        corr = np.corrcoef(np.asarray(panel.data, np.float64)[:, order], rowvar=False)
        image = _draw_heatmap(ax, corr, blocks, _panel_title(panel))
    fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.01).set_label("Pearson r over images")
    shown = (
        f"{len(order)} voxels"
        if len(order) == n_voxels
        else f"{len(order)} of {n_voxels} voxels (evenly spaced)"
    )
    n_images = panels[0].data.shape[0]
    fig.suptitle(f"Voxel x voxel correlations over {n_images} images: {shown}, ordered by ROI", fontsize=12)
    return fig


def save_figure(fig, path: str | Path, dpi: int = 150) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path


def latent_count_figure(mapping, max_cols: int = 4):
    """The latent -> voxel mapping as bar plots, one panel per ROI (the authors' per-ROI bar plots): for
    each layer, how many of its latents have their best voxel in the ROI, with the count that uniformly
    placed latents would give (the ROI's share of the voxels) as a line. ``mapping``: a
    :class:`~sae_brainmap.analysis.LatentMapping`. A matplotlib ``Figure`` (headless Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rois, layers = mapping.rois, mapping.layers
    if not rois:
        raise ValueError("no ROIs to draw")
    n_cols = min(max_cols, len(rois))
    n_rows = -(-len(rois) // n_cols)
    fig = Figure(figsize=(3.2 * n_cols + 0.4, 2.4 * n_rows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    x = np.arange(len(layers))
    assigned = mapping.n_latents - mapping.unassigned
    n_voxels = max(mapping.density.shape[1], 1)
    for ax, i in zip(axes, range(len(rois)), strict=False):
        ax.bar(x, mapping.roi_layer_counts[i], color="#377eb8")
        uniform = assigned * mapping.roi_voxels[i] / n_voxels
        ax.plot(x, uniform, color="#e41a1c", linewidth=1.2, marker=".", label="uniform")
        ax.set_title(f"{rois[i]} ({mapping.roi_voxels[i]} voxels)", fontsize=10)
        ax.set_xticks(x, [str(lay) for lay in layers], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("latents", fontsize=8)
    for ax in axes[len(rois) :]:
        ax.remove()
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle("latent -> voxel: latents whose best voxel lies in each ROI, per layer "
                 "(red: uniformly placed latents)", fontsize=11)  # fmt: skip
    return fig
