"""Cortical maps: per-voxel values (best layer, max r, a dictionary activation) on pycortex flatmaps.

Values of V voxels are put back into their volume (NaN elsewhere), sampled onto the subject's own
surfaces by pycortex (S1's ``fullhead`` transform for the synthetic subject) and drawn on the flatmap with
the curvature underneath, a title and a colorbar. ROI outlines and labels need Inkscape; where it is
missing they are left out rather than failing. Rendering is headless (matplotlib's Agg backend).
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
) -> Path:
    """Draw ``values`` of ``voxels`` (indices into a volume of ``shape``) on ``subject``'s flatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cortex = use_bundled_filestore() if subject == "S1" else __import__("cortex")
    from cortex import quickflat

    vol = volume_of(values, voxels, shape)
    finite = np.isfinite(vol)
    lo = float(np.nanmin(vol)) if vmin is None and finite.any() else vmin
    hi = float(np.nanmax(vol)) if vmax is None and finite.any() else vmax
    data = cortex.Volume(
        vol.transpose(2, 1, 0), subject, xfm, vmin=lo, vmax=hi, cmap=cmap
    )  # pycortex: z, y, x
    fig = quickflat.make_figure(
        data, with_rois=False, with_labels=False, with_colorbar=False, with_curvature=True, nanmean=True
    )
    ax = fig.axes[0]
    ax.set_title(title, fontsize=12)
    image = next((im for im in ax.get_images() if im.get_cmap().name == cmap), None)
    if image is not None:
        bar = fig.colorbar(image, ax=ax, orientation="horizontal", fraction=0.04, pad=0.02)
        bar.set_label(label)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
