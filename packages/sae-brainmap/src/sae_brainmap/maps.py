"""Cortical maps: per-voxel values (best layer, max r, a dictionary activation) on pycortex flatmaps.

Values of V voxels are put back into their volume (NaN elsewhere), sampled onto the subject's own
surfaces by pycortex (S1's ``fullhead`` transform for the synthetic subject) and drawn on the flatmap with
the curvature underneath, a title and a colorbar. pycortex's own ROI overlay needs Inkscape, so ROIs
are outlined here instead: each ROI's voxel mask goes through the same flatmap rasterisation as the data
and is contoured at 0.5, with its name at the centroid of its largest region. Rendering is headless: a
``matplotlib.figure.Figure`` on its own Agg canvas (no pyplot, no global backend or figure state).
"""

from pathlib import Path

import numpy as np

from .brain.s1 import S1_XFM, use_bundled_filestore


def volume_of(values: np.ndarray, voxels: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A NIfTI-ordered ``(x, y, z)`` volume with ``values`` at ``voxels`` ``[V, 3]`` and NaN elsewhere."""
    values = np.asarray(values, np.float32)
    if values.shape != (len(voxels),):
        raise ValueError(f"{values.shape[0] if values.ndim else 0} values for {len(voxels)} voxels")
    vol = np.full(shape, np.nan, np.float32)
    vol[tuple(np.asarray(voxels).T)] = values
    return vol


def flatmap_png(
    values: np.ndarray,
    voxels: np.ndarray,
    shape: tuple[int, int, int],
    path: str | Path,
    title: str,
    subject: str = "S1",
    xfm: str = S1_XFM,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    label: str = "",
    rois: dict[str, np.ndarray] | None = None,
) -> Path:
    """Draw ``values`` of ``voxels`` (indices into a volume of ``shape``) on ``subject``'s flatmap, with
    ``rois`` (boolean masks over ``voxels``) outlined and labelled."""
    fig = flatmap_figure(values, voxels, shape, title, subject, xfm, cmap, vmin, vmax, label, rois)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def flatmap_figure(
    values: np.ndarray,
    voxels: np.ndarray,
    shape: tuple[int, int, int],
    title: str,
    subject: str = "S1",
    xfm: str = S1_XFM,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    label: str = "",
    rois: dict[str, np.ndarray] | None = None,
):
    """The matplotlib ``Figure`` that :func:`flatmap_png` saves: a plain ``Figure`` with its own Agg canvas
    (pycortex draws into its axes; nothing is registered with pyplot, so nothing needs closing)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cortex = _cortex(subject)
    from cortex import quickflat

    vol = volume_of(values, voxels, shape)
    finite = np.isfinite(vol)
    lo = float(np.nanmin(vol)) if vmin is None and finite.any() else vmin
    hi = float(np.nanmax(vol)) if vmax is None and finite.any() else vmax
    data = cortex.Volume(
        vol.transpose(2, 1, 0), subject, xfm, vmin=lo, vmax=hi, cmap=cmap
    )  # pycortex: z, y, x
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    quickflat.make_figure(  # given axes, pycortex uses no pyplot (with_colorbar=False)
        data,
        with_rois=False,
        with_labels=False,
        with_colorbar=False,
        with_curvature=True,
        nanmean=True,
        fig=ax,
    )
    imsize = ax.get_images()[0].get_size()  # what pycortex does to a figure of its own: 1 pixel per pixel
    fig.set_size_inches(np.array(imsize)[::-1] / 100.0)
    ax.set_title(title, fontsize=12)
    image = next((im for im in ax.get_images() if im.get_cmap().name == cmap), None)
    if image is not None:
        bar = fig.colorbar(image, ax=ax, orientation="horizontal", fraction=0.04, pad=0.02)
        bar.set_label(label)
    for name, mask in (rois or {}).items():
        draw_roi_outline(ax, name, mask, voxels, shape, subject, xfm)
    return fig


def _cortex(subject: str):
    return use_bundled_filestore() if subject == "S1" else __import__("cortex")


def roi_flatmap(
    mask: np.ndarray, voxels: np.ndarray, shape: tuple[int, int, int], subject: str = "S1", xfm: str = S1_XFM
) -> tuple[np.ndarray, np.ndarray]:
    """An ROI's mask (over ``voxels``) rasterised like the data: the flatmap image (per pixel, the
    fraction of the cortical depth inside the ROI; NaN off the cortex) and its extents ``[left, right,
    bottom, top]``. Every voxel outside the ROI is 0 (not NaN) so that the outline closes."""
    cortex = _cortex(subject)
    from cortex.quickflat.utils import make_flatmap_image

    inside = np.nan_to_num(volume_of(np.asarray(mask, np.float32), voxels, shape), nan=0.0)
    img, extents = make_flatmap_image(cortex.Volume(inside.transpose(2, 1, 0), subject, xfm), nanmean=True)
    return img, np.asarray(extents, np.float64)


def pixel_centres(img_shape: tuple[int, int], extents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x of each column and y of each row of a flatmap image drawn by ``imshow`` (origin upper) over
    ``extents``."""
    left, right, bottom, top = extents
    rows, cols = img_shape
    x = left + (np.arange(cols) + 0.5) * (right - left) / cols
    y = top - (np.arange(rows) + 0.5) * (top - bottom) / rows
    return x, y


def label_anchor(inside: np.ndarray) -> tuple[int, int] | None:
    """(row, col) for an ROI's label: the pixel of its largest connected region nearest that region's
    centroid (a crescent's centroid lies outside it). None: the ROI has no pixels."""
    from scipy import ndimage

    labels, n = ndimage.label(inside)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    rows, cols = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
    return int(rows[nearest]), int(cols[nearest])


def draw_roi_outline(
    ax, name: str, mask: np.ndarray, voxels: np.ndarray, shape: tuple[int, int, int], subject: str, xfm: str
) -> None:
    """Outline ROI ``name`` on a flatmap's axes and label it once; an ROI that misses the cortex is left
    out."""
    img, extents = roi_flatmap(mask, voxels, shape, subject, xfm)
    inside = np.nan_to_num(img, nan=0.0) > 0.5
    anchor = label_anchor(inside)
    if anchor is None:
        return
    from matplotlib import patheffects

    x, y = pixel_centres(img.shape, extents)
    limits = ax.get_xlim(), ax.get_ylim()
    outline = ax.contour(x, y, np.nan_to_num(img, nan=0.0), levels=[0.5], colors="white", linewidths=0.8,
                         zorder=3)  # fmt: skip
    outline.set_path_effects([patheffects.withStroke(linewidth=1.8, foreground="black")])  # seen on yellow
    ax.set_xlim(limits[0])  # contour's autoscaling must not move the flatmap
    ax.set_ylim(limits[1])
    row, col = anchor
    ax.text(x[col], y[row], name, color="white", fontsize=8, ha="center", va="center", zorder=4,
            path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])  # fmt: skip
