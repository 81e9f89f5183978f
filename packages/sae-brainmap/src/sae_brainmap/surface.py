"""Cortical maps on the inflated fsaverage surface (nilearn), for surface data such as Algonauts 2023.

Per-vertex values of both hemispheres are drawn on nilearn's bundled fsaverage5 inflated mesh (10,242
vertices per hemisphere, shipped inside nilearn: nothing is downloaded) over its sulcal depth, from a
few views, with one shared colour scale, a title and optional ROI outlines. Rendering is headless: a
``matplotlib.figure.Figure`` on its own Agg canvas (no pyplot, no global backend or figure state).

Accepted lengths per hemisphere: 10,242 (fsaverage5, drawn as given) or 163,842 (the full fsaverage,
where Algonauts 2023 and NSD's surface data live). Full-fsaverage vectors are downsampled by keeping
their first 10,242 entries: FreeSurfer's icosahedral meshes are nested, each order keeping the vertices
of the order below first and appending the midpoints of its edges, so fsaverage5's vertex i *is*
fsaverage's vertex i (the tests check this against pycortex's neighbour tables, which were computed on
fsaverage's own sphere). This is decimation, not averaging: each drawn vertex shows its own value.
NaN vertices (outside the data) show the background; a face touching one is left uncoloured.
"""

from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import numpy as np

FSAVERAGE5_VERTICES = 10_242
FSAVERAGE_VERTICES = 163_842
HEMIS = ("left", "right")
VIEWS = ("lateral", "medial", "ventral")
# Outline colours for ROIs: strong, and distinct from the usual sequential data colour maps.
ROI_COLORS = ("white", "black", "#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#a65628")
# Background shading: sulcal depth squeezed into this range of matplotlib's gray_r (0 white, 1 black),
# light gyri and mid-grey sulci, so that data colours stay readable on top.
BACKGROUND_RANGE = (0.2, 0.5)
# How far each 3D panel zooms in: nilearn's default 1.3 leaves a wide empty margin in a grid of panels.
PANEL_ZOOM = 1.75


def to_fsaverage5(values, what: str = "values") -> np.ndarray:
    """``values`` of one hemisphere as a float32 vector on fsaverage5's 10,242 vertices.

    A 10,242-vector passes through; a 163,842-vector (full fsaverage) keeps its first 10,242 entries,
    which are fsaverage5's vertices in the same order (see the module docstring)."""
    v = np.asarray(values, dtype=np.float32)
    if v.ndim != 1 or v.shape[0] not in (FSAVERAGE5_VERTICES, FSAVERAGE_VERTICES):
        raise ValueError(
            f"{what} has shape {v.shape}; expected one vector per hemisphere of {FSAVERAGE5_VERTICES:,} "
            f"(fsaverage5) or {FSAVERAGE_VERTICES:,} (fsaverage) vertices"
        )
    return v[:FSAVERAGE5_VERTICES].copy()


def surface_maps(lh_values, rh_values) -> dict[str, np.ndarray]:
    """The per-vertex arrays that ``fsaverage_png`` hands to nilearn: ``{"left": [10242], "right": ...}``."""
    return {"left": to_fsaverage5(lh_values, "lh_values"), "right": to_fsaverage5(rh_values, "rh_values")}


def roi_masks_fsaverage5(rois: Mapping[str, tuple]) -> dict[str, dict[str, np.ndarray]]:
    """``{name: (lh_mask, rh_mask)}`` (bool, 0/1 or NaN-filled, on fsaverage5 or fsaverage) as
    ``{hemi: {name: bool [10242]}}``; NaN counts as outside."""
    out: dict[str, dict[str, np.ndarray]] = {h: {} for h in HEMIS}
    for name, masks in rois.items():
        if len(masks) != 2:
            raise ValueError(f"ROI {name!r}: expected a pair (lh_mask, rh_mask), got {len(masks)} items")
        for hemi, mask in zip(HEMIS, masks, strict=True):
            out[hemi][name] = np.nan_to_num(to_fsaverage5(mask, f"ROI {name!r} ({hemi})")) > 0
    return out


def color_limits(maps: Mapping[str, np.ndarray], vmin=None, vmax=None) -> tuple[float, float]:
    """One colour range for both hemispheres: the given limits, else the finite data's min and max."""
    finite = np.concatenate([m[np.isfinite(m)] for m in maps.values()])
    lo = float(vmin) if vmin is not None else float(finite.min()) if finite.size else 0.0
    hi = float(vmax) if vmax is not None else float(finite.max()) if finite.size else 1.0
    if hi <= lo:  # a constant map: widen so that nilearn's rescaling does not divide by zero
        lo, hi = lo - 0.5, lo + 0.5
    return lo, hi


@cache
def fsaverage5_inflated():
    """nilearn's bundled fsaverage5 inflated mesh (a PolyMesh with ``left`` and ``right`` parts)."""
    from nilearn.datasets import load_fsaverage

    return load_fsaverage("fsaverage5")["inflated"]


@cache
def fsaverage5_background() -> dict[str, np.ndarray]:
    """Sulcal depth per hemisphere, rescaled into ``BACKGROUND_RANGE`` (shading, not data)."""
    from nilearn.datasets import load_fsaverage_data

    sulc = load_fsaverage_data("fsaverage5", mesh_type="inflated", data_type="sulcal")
    out = {}
    for hemi in HEMIS:
        s = np.asarray(sulc.data.parts[hemi], np.float64).ravel()
        s = (s - s.min()) / max(s.max() - s.min(), 1e-12)
        out[hemi] = BACKGROUND_RANGE[0] + s * (BACKGROUND_RANGE[1] - BACKGROUND_RANGE[0])
    return out


def _draw_outlines(ax, fig, mesh, masks: Mapping[str, np.ndarray], colors: Mapping[str, str]) -> set[str]:
    """Colour the faces along each ROI's border (nilearn's contour plotting) on an existing panel;
    returns the names of the ROIs outlined."""
    from nilearn import plotting

    faces, drawn = np.asarray(mesh.faces), set()
    for name, mask in masks.items():
        # nilearn refuses a mask with no face holding two of its vertices (absent from this hemisphere,
        # or scattered single vertices): there is no border to draw then.
        if (mask[faces].sum(axis=1) >= 2).any():
            plotting.plot_surf_contours(
                mesh, mask.astype(np.int8), levels=[1], colors=[colors[name]], axes=ax, figure=fig
            )
            drawn.add(name)
    return drawn


def _fill_panel(ax) -> None:
    """Zoom a 3D panel in and let the mesh run past its square box into the wider grid cell (a lateral
    view is ~1.6 times wider than tall, and matplotlib keeps 3D axes square)."""
    ax.set_box_aspect(None, zoom=PANEL_ZOOM)
    for artist in ax.collections:
        artist.set_clip_on(False)


def _layout(n_views: int, legend: bool) -> tuple[tuple[float, float], dict]:
    """Figure size (inches) and, as figure fractions, the panel grid and the colorbar's box: from the
    top, a title band, two rows of panels, the colorbar with its label, and the ROI legend if any."""
    title, panels, colorbar, legend_band = 0.65, 3.95, 1.0, 0.6 if legend else 0.0
    height = title + panels + colorbar + legend_band
    grid = {"left": 0.4 / (2.9 * n_views + 0.4), "right": 0.99, "top": 1 - title / height,
            "bottom": (colorbar + legend_band) / height}  # fmt: skip
    bar = (0.3, (legend_band + 0.55) / height, 0.4, 0.17 / height)
    return (2.9 * n_views + 0.4, height), {"grid": grid, "colorbar": bar}


def _label_grid(fig, grid, rows: Sequence[str], cols: Sequence[str]) -> None:
    """Row labels at the left edge and column labels above the grid, in figure coordinates (the meshes
    run past their 3D axes, so labels tied to the axes would sit on top of them)."""
    for c, text in enumerate(cols):
        cell = grid[0, c].get_position(fig)
        fig.text((cell.x0 + cell.x1) / 2, cell.y1 + 0.01, text, ha="center", va="bottom", fontsize=11)
    for r, text in enumerate(rows):
        cell = grid[r, 0].get_position(fig)
        fig.text(0.012, (cell.y0 + cell.y1) / 2, text, rotation=90, ha="left", va="center", fontsize=11)


def fsaverage_png(
    lh_values,
    rh_values,
    path: str | Path,
    *,
    title: str,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    label: str = "",
    views: Sequence[str] = VIEWS,
    rois: Mapping[str, tuple] | None = None,
    roi_colors: Mapping[str, str] | None = None,
    dpi: int = 150,
) -> Path:
    """Draw per-vertex values of both hemispheres on the inflated fsaverage5 surface and write a PNG.

    ``lh_values`` / ``rh_values``: one vector per hemisphere on fsaverage5 (10,242) or fsaverage
    (163,842), NaN where there is no data. Rows are the hemispheres, columns the ``views`` (nilearn's
    names: lateral, medial, dorsal, ventral, anterior, posterior). ``rois``: ``{name: (lh_mask,
    rh_mask)}`` drawn as outlines with a legend. The colour range is shared by all panels: ``vmin`` /
    ``vmax``, else the data's finite min and max."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.lines import Line2D
    from nilearn import plotting

    maps = surface_maps(lh_values, rh_values)
    outlines = roi_masks_fsaverage5(rois or {})
    names = list(rois or {})
    colors = {n: (roi_colors or {}).get(n, ROI_COLORS[i % len(ROI_COLORS)]) for i, n in enumerate(names)}
    lo, hi = color_limits(maps, vmin, vmax)
    mesh, background = fsaverage5_inflated(), fsaverage5_background()

    size, bands = _layout(len(views), legend=bool(names))
    drawn: set[str] = set()  # ROIs with a border somewhere: the legend lists only those
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(views), **bands["grid"], wspace=0, hspace=0)
    for row, hemi in enumerate(HEMIS):
        for col, view in enumerate(views):
            ax = fig.add_subplot(grid[row, col], projection="3d")
            plotting.plot_surf(
                mesh.parts[hemi], surf_map=maps[hemi], bg_map=background[hemi], hemi=hemi, view=view,
                engine="matplotlib", cmap=cmap, colorbar=False, vmin=lo, vmax=hi, axes=ax, figure=fig,
            )  # fmt: skip
            drawn |= _draw_outlines(ax, fig, mesh.parts[hemi], outlines[hemi], colors)
            _fill_panel(ax)
    _label_grid(fig, grid, rows=[f"{h} hemisphere" for h in HEMIS], cols=list(views))

    cax = fig.add_axes(bands["colorbar"])
    bar = fig.colorbar(ScalarMappable(Normalize(lo, hi), cmap), cax=cax, orientation="horizontal")
    bar.set_label(label)
    if drawn:
        handles = [Line2D([], [], color=colors[n], lw=3, label=n) for n in names if n in drawn]
        legend = fig.legend(
            handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.01), fontsize=9,
            ncol=min(len(handles), 2 * len(views)), facecolor="0.85", title="ROI outlines", title_fontsize=9,
        )  # fmt: skip
        legend.get_frame().set_edgecolor("0.6")
    # The title goes last: nilearn's contour helper copies an existing suptitle onto every panel.
    fig.suptitle(title, fontsize=13, y=0.97)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path
