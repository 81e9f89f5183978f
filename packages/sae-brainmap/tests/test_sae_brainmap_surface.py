"""Maps on nilearn's fsaverage5 surface, and Algonauts challenge-space vectors put back onto fsaverage."""

import importlib.util
from pathlib import Path

import nilearn.plotting
import numpy as np
import pytest
from PIL import Image

from sae_brainmap.brain import BrainDataError
from sae_brainmap.brain.algonauts import challenge_to_fsaverage, read_fsaverage_masks, scatter_to_fsaverage
from sae_brainmap.surface import (
    FSAVERAGE5_VERTICES,
    FSAVERAGE_VERTICES,
    fsaverage5_inflated,
    fsaverage_png,
    surface_maps,
)


def _edge_codes(faces: np.ndarray) -> np.ndarray:
    """Each undirected edge of a triangle mesh as one integer ``a * n + b`` (a < b)."""
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [0, 2]]]), axis=1)
    return np.unique(e[:, 0].astype(np.int64) * FSAVERAGE5_VERTICES + e[:, 1])


def test_fsaverage5_is_the_first_10242_vertices_of_fsaverage():
    """pycortex ships, computed on fsaverage's own sphere, the nearest fsaverage5 (first 10,242) and
    fsaverage6 (first 40,962) vertex of every fsaverage vertex. The fsaverage6 vertices past 10,242 are the
    midpoints of fsaverage5's edges; the fsaverage5 vertices nearest to such a midpoint and to its
    fsaverage7 neighbours are that edge's two ends. Every pair recovered that way must be an edge of
    nilearn's fsaverage5 mesh under the identity map (a random relabelling matches ~15 of 25,000)."""
    spec = importlib.util.find_spec("cortex")  # pycortex is a locked dependency: its table must be there
    table = Path(spec.origin).parent / "data" / "upsample_fsaverage_neighbors.npz"
    assert table.is_file(), f"pycortex no longer ships {table.name}; this check needs another reference"
    n6_count = 40_962
    with np.load(table) as t:
        for pc_hemi, hemi in (("lh", "left"), ("rh", "right")):
            near5 = np.concatenate([np.arange(FSAVERAGE5_VERTICES), t[f"{pc_hemi}_ico5"]])
            near6 = np.concatenate([np.arange(n6_count), t[f"{pc_hemi}_ico6"]])
            assert len(near5) == len(near6) == FSAVERAGE_VERTICES
            mid = np.arange(FSAVERAGE5_VERTICES, n6_count)  # fsaverage6's new vertices
            beyond = np.arange(n6_count, FSAVERAGE_VERTICES)
            beyond = beyond[near6[beyond] >= FSAVERAGE5_VERTICES]  # fsaverage7 vertices next to a midpoint
            pairs = np.unique(
                np.concatenate([np.stack([mid, near5[mid]], 1), np.stack([near6[beyond], near5[beyond]], 1)]),
                axis=0,
            )
            ms, counts = np.unique(pairs[:, 0], return_counts=True)
            assert counts.max() == 2  # a midpoint is near exactly the two ends of its edge
            ends = np.sort(pairs[np.isin(pairs[:, 0], ms[counts == 2]), 1].reshape(-1, 2), axis=1)
            codes = ends[:, 0].astype(np.int64) * FSAVERAGE5_VERTICES + ends[:, 1]
            fs5_edges = _edge_codes(np.asarray(fsaverage5_inflated().parts[hemi].faces))
            assert len(fs5_edges) == 30_720 and len(codes) > 20_000
            assert np.isin(codes, fs5_edges).all()


def test_full_fsaverage_values_are_drawn_from_their_first_10242_vertices(tmp_path, monkeypatch):
    lh = np.arange(FSAVERAGE_VERTICES, dtype=np.float64)  # every vertex a distinct value
    rh = -lh - 1
    maps = surface_maps(lh, rh)
    np.testing.assert_array_equal(maps["left"], np.arange(FSAVERAGE5_VERTICES))
    np.testing.assert_array_equal(maps["right"], -np.arange(FSAVERAGE5_VERTICES) - 1)

    handed = []  # what nilearn receives, panel by panel
    real_plot_surf = nilearn.plotting.plot_surf

    def spy(surf_mesh, surf_map=None, **kw):
        handed.append((kw["hemi"], kw["view"], np.array(surf_map), surf_mesh.n_vertices))
        return real_plot_surf(surf_mesh, surf_map=surf_map, **kw)

    monkeypatch.setattr(nilearn.plotting, "plot_surf", spy)
    only_lh, dot, nowhere = (np.zeros(FSAVERAGE_VERTICES, bool) for _ in range(3))
    only_lh[:3000] = dot[5] = True  # a region in lh only, and one vertex: no border to draw
    rois = {"lh only": (only_lh, nowhere), "dot": (dot, dot)}
    path = fsaverage_png(lh, rh, tmp_path / "full.png", title="fsaverage", views=("lateral",), rois=rois)
    assert path.is_file() and Image.open(path).size[0] > 300
    assert [(h, v) for h, v, *_ in handed] == [("left", "lateral"), ("right", "lateral")]
    for (_, _, surf_map, n_vertices), expected in zip(handed, (lh, rh), strict=True):
        assert n_vertices == FSAVERAGE5_VERTICES
        np.testing.assert_array_equal(surf_map, expected[:FSAVERAGE5_VERTICES])


def test_fsaverage5_png_colours_data_and_leaves_nan_as_background(tmp_path):
    """Vertices with data at the colour map's top (viridis yellow); the rest NaN. Were NaN drawn as a
    colour (or filled with 0, vmin's dark purple) the surface would not be grey."""
    coords = {h: np.asarray(fsaverage5_inflated().parts[h].coordinates) for h in ("left", "right")}
    back = {h: c[:, 1] < np.percentile(c[:, 1], 30) for h, c in coords.items()}  # occipital third
    lh, rh = (np.where(back[h], 1.0, np.nan) for h in ("left", "right"))
    roi = {h: back[h] & (coords[h][:, 2] > np.median(coords[h][back[h], 2])) for h in back}
    path = fsaverage_png(
        lh, rh, tmp_path / "fs5.png", title="planted", cmap="viridis", vmin=0, vmax=1, label="value",
        rois={"upper": (roi["left"], roi["right"])}, roi_colors={"upper": "red"},
    )  # fmt: skip
    img = np.asarray(Image.open(path).convert("RGB"), np.int32)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    yellow = (r > 200) & (g > 200) & (b < 80)
    purple = (r < 100) & (g < 40) & (b > 60) & (b < 140)  # viridis(0) = (68, 1, 84)
    grey = (abs(r - g) < 6) & (abs(g - b) < 6) & (r > 90) & (r < 220)
    red = (r > 200) & (g < 60) & (b < 60)
    rows = np.flatnonzero(purple.any(axis=1))  # purple only in one thin strip: the colorbar's low end
    assert purple.sum() > 100 and rows.max() - rows.min() < 40
    above = slice(0, rows.min())  # the panels, above the colorbar
    assert yellow[above].sum() > 5_000 and grey[above].sum() > 20_000 and red[above].sum() > 200


@pytest.mark.parametrize("n", [0, 10_241, 40_962, 163_841])
def test_other_lengths_are_one_clear_error(n):
    with pytest.raises(
        ValueError, match=r"lh_values has shape .*10,242 \(fsaverage5\) or 163,842 \(fsaverage\)"
    ):
        surface_maps(np.zeros(n), np.zeros(FSAVERAGE5_VERTICES))
    with pytest.raises(ValueError, match="rh_values has shape"):
        surface_maps(np.zeros(FSAVERAGE5_VERTICES), np.zeros((2, FSAVERAGE5_VERTICES)))


def _write_masks(sub: Path, lh: np.ndarray, rh: np.ndarray) -> None:
    (sub / "roi_masks").mkdir(parents=True, exist_ok=True)
    np.save(sub / "roi_masks" / "lh.all-vertices_fsaverage_space.npy", lh)
    np.save(sub / "roi_masks" / "rh.all-vertices_fsaverage_space.npy", rh)


def test_challenge_space_goes_back_onto_fsaverage(tmp_path):
    rng = np.random.default_rng(0)
    lh_mask, rh_mask = (rng.random(FSAVERAGE_VERTICES) < p for p in (0.12, 0.1))
    _write_masks(tmp_path, lh_mask.astype(np.int64), rh_mask.astype(np.int64))  # 0/1 ints, as shipped
    n_lh, n_rh = int(lh_mask.sum()), int(rh_mask.sum())
    values = rng.normal(size=n_lh + n_rh).astype(np.float32)

    lh, rh = challenge_to_fsaverage(values, tmp_path)
    for out, mask, part in ((lh, lh_mask, values[:n_lh]), (rh, rh_mask, values[n_lh:])):
        expected = np.full(FSAVERAGE_VERTICES, np.nan, np.float32)  # the devkit's own scatter
        expected[np.where(mask)[0]] = part
        np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(np.concatenate([lh[lh_mask], rh[rh_mask]]), values)  # and back again

    responses = rng.normal(size=(3, n_lh + n_rh)).astype(np.float32)  # [N, V] rows at once
    lh3, rh3 = challenge_to_fsaverage(responses, tmp_path, fill=0.0)
    assert lh3.shape == (3, FSAVERAGE_VERTICES) and (lh3[:, ~lh_mask] == 0).all()
    np.testing.assert_array_equal(rh3[:, rh_mask], responses[:, n_lh:])

    roi = np.zeros(n_lh + n_rh, bool)
    roi[[0, n_lh + 1]] = True  # an ROI mask from load_algonauts
    roi_lh, roi_rh = scatter_to_fsaverage(roi, *read_fsaverage_masks(tmp_path))
    assert np.flatnonzero(roi_lh == 1).tolist() == [np.flatnonzero(lh_mask)[0]]
    assert np.flatnonzero(roi_rh == 1).tolist() == [np.flatnonzero(rh_mask)[1]]
    assert np.isnan(roi_lh[~lh_mask]).all() and (roi_lh[lh_mask][1:] == 0).all()


def test_challenge_space_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(BrainDataError, match=r"challenge-space mask not found: .*lh\.all-vertices_fsaverage"):
        challenge_to_fsaverage(np.zeros(3), tmp_path)
    mask = np.zeros(FSAVERAGE_VERTICES, np.int64)
    mask[:5] = 1
    _write_masks(tmp_path, mask, mask)
    with pytest.raises(BrainDataError, match=r"7 challenge-space values, but .* 5 \+ 5 = 10 vertices"):
        challenge_to_fsaverage(np.zeros(7), tmp_path)
    _write_masks(tmp_path, mask, mask[:FSAVERAGE5_VERTICES])
    with pytest.raises(BrainDataError, match=r"rh\.all-vertices.*expected a 0/1 vector over the 163,842"):
        read_fsaverage_masks(tmp_path)
    _write_masks(tmp_path, mask * 2, mask)
    with pytest.raises(BrainDataError, match="0/1 vector"):
        read_fsaverage_masks(tmp_path)
