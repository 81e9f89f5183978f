"""ROI-aware figures: the RSA heat maps ordered by ROI, and ROI outlines drawn on pycortex flatmaps
without Inkscape. (The heat maps inside a ``sae-brainmap run`` are checked with the pipeline's tiny run.)"""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from sae_brainmap.brain.s1 import s1_anatomy
from sae_brainmap.figures import RSAPanel, rsa_heatmap_figure
from sae_brainmap.maps import flatmap_figure, roi_flatmap

ROI_NAMES = ["V1", "FFA", "PPA"]


def _panels(n_voxels: int, seed: int = 0) -> tuple[list[RSAPanel], np.ndarray]:
    rng = np.random.default_rng(seed)
    # interleaved labels, one voxel in no listed ROI: the figure has to reorder them
    roi = np.array([["PPA", "V1", "FFA", "", "V1"][i % 5] for i in range(n_voxels)])
    brain, model = rng.normal(size=(30, n_voxels)), rng.normal(size=(30, n_voxels))
    return [RSAPanel("brain", brain), RSAPanel("model", model, rho=0.25, p_value=0.01)], roi


def _drawn(fig) -> list[np.ndarray]:
    return [np.asarray(ax.get_images()[0].get_array()) for ax in fig.axes if ax.get_images()]


def test_rsa_heatmaps_are_the_correlations_of_the_roi_ordered_voxels():
    panels, roi = _panels(23)
    fig = rsa_heatmap_figure(panels, roi, ROI_NAMES)
    rank = {"V1": 0, "FFA": 1, "PPA": 2, "": 3}
    order = sorted(range(len(roi)), key=lambda i: (rank[roi[i]], i))
    drawn = _drawn(fig)
    assert len(drawn) == 2
    for panel, matrix in zip(panels, drawn, strict=True):
        np.testing.assert_allclose(matrix, np.corrcoef(panel.data[:, order].T), atol=1e-12)
        assert matrix.shape == (23, 23)
    heatmap = next(ax for ax in fig.axes if ax.get_images())
    assert [t.get_text() for t in heatmap.get_xticklabels()] == ["V1", "FFA", "PPA", "other"]
    assert [im.get_clim() for im in heatmap.get_images()] == [(-1, 1)]
    assert "rho 0.250" in fig.axes[1].get_title() and "p 0.01" in fig.axes[1].get_title()
    assert "23 voxels" in fig._suptitle.get_text()


def test_rsa_heatmaps_subsample_many_voxels_keeping_rois_contiguous():
    panels, roi = _panels(1203)
    fig = rsa_heatmap_figure(panels, roi, ROI_NAMES, max_voxels=500)
    brain = _drawn(fig)[0]
    assert brain.shape == (500, 500)
    assert "500 of 1203 voxels" in fig._suptitle.get_text()
    # every drawn column is one of the brain's voxels, and ROIs come in contiguous blocks in order
    corr = np.corrcoef(panels[0].data.T)
    rank = {"V1": 0, "FFA": 1, "PPA": 2, "": 3}
    order = np.array(sorted(range(len(roi)), key=lambda i: (rank[roi[i]], i)))
    kept = order[np.round(np.linspace(0, len(order) - 1, 500)).astype(int)]
    np.testing.assert_allclose(brain, corr[np.ix_(kept, kept)], atol=1e-12)
    ranks = [rank[roi[i]] for i in kept]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1, 2, 3}


def test_rsa_heatmaps_refuse_data_for_other_voxels():
    panels, roi = _panels(10)
    with pytest.raises(ValueError, match="not \\[N images, 9 voxels\\]"):
        rsa_heatmap_figure(panels, roi[:9], ROI_NAMES)


@pytest.fixture(scope="module")
def ffa(tmp_path_factory):
    anatomy = s1_anatomy(rois=("V1", "FFA"), cache=tmp_path_factory.mktemp("s1") / "s1.npz")
    vox = np.concatenate([anatomy.rois["V1"], anatomy.rois["FFA"]])
    in_ffa = np.arange(len(vox)) >= len(anatomy.rois["V1"])
    return vox, anatomy.shape, in_ffa


def _contour_vertices(ax) -> np.ndarray:
    from matplotlib.contour import ContourSet

    sets = [c for c in ax.collections if isinstance(c, ContourSet)]
    assert len(sets) == 1
    return np.concatenate([p.vertices for p in sets[0].get_paths() if len(p.vertices)])


def test_roi_outline_lies_on_the_rois_flatmap_and_is_labelled(ffa):
    vox, shape, in_ffa = ffa
    fig = flatmap_figure(in_ffa.astype(float), vox, shape, "FFA outlined", rois={"FFA": in_ffa})
    assert plt.get_fignums() == []  # a plain Figure: pyplot holds nothing, its backend is left alone
    try:
        ax = fig.axes[0]
        vertices = _contour_vertices(ax)
        # the reference: the bounding box of the pixels the data image shows as FFA (value 1)
        data = next(im for im in ax.get_images() if im.get_cmap().name == "viridis")
        img = np.ma.filled(np.asarray(data.get_array(), np.float64), np.nan)
        left, right, bottom, top = data.get_extent()
        rows, cols = np.nonzero(np.nan_to_num(img, nan=0.0) > 0.5)
        dx, dy = (right - left) / img.shape[1], (top - bottom) / img.shape[0]
        x_lo, x_hi = left + cols.min() * dx - dx, left + (cols.max() + 1) * dx + dx
        y_hi, y_lo = top - rows.min() * dy + dy, top - (rows.max() + 1) * dy - dy
        assert len(vertices) > 20
        assert (vertices[:, 0] >= x_lo).all() and (vertices[:, 0] <= x_hi).all()
        assert (vertices[:, 1] >= y_lo).all() and (vertices[:, 1] <= y_hi).all()
        # not just inside: the outline spans the ROI (both hemispheres' FFA)
        assert vertices[:, 0].max() - vertices[:, 0].min() > 0.5 * (x_hi - x_lo)
        assert [t.get_text() for t in ax.texts] == ["FFA"]
        assert (ax.get_xlim(), ax.get_ylim()) == ((left, right), (bottom, top))
    finally:
        plt.close(fig)


def test_roi_flatmap_is_one_inside_and_zero_outside(ffa):
    vox, shape, in_ffa = ffa
    img, extents = roi_flatmap(in_ffa, vox, shape)
    values = img[np.isfinite(img)]
    assert ((values >= 0) & (values <= 1)).all() and (values == 1).sum() > 100 and (values == 0).sum() > 1000
    assert extents[0] < extents[1] and extents[2] < extents[3]


def test_flatmap_without_rois_has_no_outlines(ffa):
    vox, shape, in_ffa = ffa
    fig = flatmap_figure(in_ffa.astype(float), vox, shape, "no outlines", rois=None)
    try:
        assert not fig.axes[0].collections and not fig.axes[0].texts
    finally:
        plt.close(fig)
