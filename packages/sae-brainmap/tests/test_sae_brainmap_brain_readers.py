import itertools
import pickle
import warnings

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.io import savemat
from scipy.stats import zscore as scipy_zscore

import sae_brainmap.brain.nsd as nsd_module
from sae_brainmap.alignment import top_matches
from sae_brainmap.brain import (
    BrainDataError,
    BrainDataWarning,
    ExpDesign,
    load_algonauts,
    load_expdesign,
    load_nsd_betas,
    noise_ceiling,
    nsd_image_ids,
    read_ctab,
    read_mapping,
    read_session_betas,
    roi_masks,
    session_trials,
    volume_at,
)

SHAPE = (4, 5, 3)
RUNS = (5, 4, 3)  # 12 trials a session in this miniature


@pytest.fixture
def nsd(tmp_path):
    """Two sessions of int16 betas (x300), a 1-based design in which 8 images repeat, and a ROI file."""
    rng = np.random.default_rng(0)
    n_img = 8
    order = np.concatenate([rng.permutation(n_img) for _ in range(3)])  # 24 trials, 3 repeats
    subjectim = np.stack([rng.permutation(100)[:n_img] for _ in range(8)])  # 0-based ids
    savemat(tmp_path / "nsd_expdesign.mat", {
        "masterordering": (order + 1)[None].astype(np.double),
        "subjectim": (subjectim + 1).astype(np.double),
        "sharedix": (subjectim[0, :2] + 1)[None].astype(np.double),
    })  # fmt: skip
    betas = (rng.normal(0, 2, (24, *SHAPE)) * 300).astype(np.int16)  # [trials, X, Y, Z]
    affine = np.diag([1.8, 1.8, 1.8, 1])
    for s in range(2):
        data = np.moveaxis(betas[12 * s : 12 * (s + 1)], 0, -1)
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"betas_session{s + 1:02d}.nii.gz")
        with h5py.File(tmp_path / f"betas_session{s + 1:02d}.hdf5", "w") as f:
            f["betas"] = data.T  # NSD's hdf5 order: (T, Z, Y, X)
    roi = np.zeros(SHAPE, np.int16) - 1
    roi[:2, :, 1] = 1  # V1v
    roi[2:, :3, :] = 7  # hV4
    nib.save(nib.Nifti1Image(roi, affine), tmp_path / "prf-visualrois.nii.gz")
    (tmp_path / "prf-visualrois.mat.ctab").write_text("0 Unknown\n1 V1v\n2 V1d\n7 hV4\n")
    return tmp_path, betas, order, subjectim


def _expected(betas, order, subjectim, mask, subject=2):
    """Independent: scipy z-score per run, then an explicit loop over images."""
    x = betas[:, mask].astype(np.float64) / 300
    bounds = np.cumsum([0, *RUNS, *RUNS])
    z = np.concatenate([scipy_zscore(x[a:b], axis=0) for a, b in itertools.pairwise(bounds)])
    ids = subjectim[subject - 1, order]
    uniq = sorted(set(ids.tolist()))
    return np.stack([z[ids == i].mean(0) for i in uniq]), np.array(uniq)


@pytest.mark.parametrize("ext", ["nii.gz", "hdf5"])
def test_nsd_betas_zscored_per_run_and_averaged(nsd, ext):
    root, betas, order, subjectim = nsd
    masks = roi_masks({"prf-visualrois": root / "prf-visualrois.nii.gz"}, ["V1v", "hV4"])
    mask = masks["V1v"] | masks["hV4"]
    files = [root / f"betas_session{s:02d}.{ext}" for s in (1, 2)]
    got = load_nsd_betas(files, root / "nsd_expdesign.mat", subject=2, mask=mask, run_lengths=RUNS)
    want, ids = _expected(betas, order, subjectim, mask)
    np.testing.assert_array_equal(got.images, ids)
    np.testing.assert_allclose(got.responses, want, atol=1e-5)
    assert (got.n_repeats == 3).all() and got.voxels.shape == (mask.sum(), 3)


def test_nsd_betas_zscored_per_session(nsd):
    root, betas, order, subjectim = nsd
    mask = np.ones(SHAPE, bool)
    files = [root / f"betas_session{s:02d}.nii.gz" for s in (1, 2)]
    got = load_nsd_betas(files, root / "nsd_expdesign.mat", 1, mask, zscore_by="session")
    x = betas.reshape(24, -1) / 300
    z = np.concatenate([scipy_zscore(x[:12], axis=0), scipy_zscore(x[12:], axis=0)])
    ids = subjectim[0, order]
    np.testing.assert_allclose(got.responses[0], z[ids == got.images[0]].mean(0), atol=1e-5)


def test_expdesign_is_converted_to_0_based(nsd):
    root, _, order, subjectim = nsd
    d = load_expdesign(root / "nsd_expdesign.mat")
    np.testing.assert_array_equal(d.masterordering, order)
    np.testing.assert_array_equal(d.trial_images(3, 5), subjectim[2, order[:5]])
    np.testing.assert_array_equal(d.sharedix, subjectim[0, :2])


def test_roi_masks_with_a_ctab_and_unknown_names(nsd):
    root, *_ = nsd
    files = {"prf-visualrois": root / "prf-visualrois.nii.gz"}
    m = roi_masks(files, ["V1v"], {"prf-visualrois": root / "prf-visualrois.mat.ctab"})
    assert m["V1v"].sum() == 2 * 5 and m["V1v"][:2, :, 1].all()
    assert read_ctab(root / "prf-visualrois.mat.ctab") == {1: "V1v", 2: "V1d", 7: "hV4"}
    with pytest.raises(BrainDataError, match=r"unknown ROI name\(s\) 'FFA'; available: .*V1v"):
        roi_masks(files, ["FFA"], {"prf-visualrois": root / "prf-visualrois.mat.ctab"})


def test_nsd_errors_say_what_is_wrong(nsd, tmp_path):
    root, *_ = nsd
    mask = np.ones(SHAPE, bool)
    design = root / "nsd_expdesign.mat"
    with pytest.raises(BrainDataError, match=r"NSD betas file not found: .*nope\.nii\.gz"):
        load_nsd_betas([root / "nope.nii.gz"], design, 1, mask, run_lengths=RUNS)
    with pytest.raises(BrainDataError, match="does not match the mask"):
        load_nsd_betas(
            [root / "betas_session01.nii.gz"], design, 1, np.ones((2, 2, 2), bool), run_lengths=RUNS
        )
    with pytest.raises(BrainDataError, match="run lengths sum to 750 trials but the session has 12"):
        load_nsd_betas([root / "betas_session01.nii.gz"], design, 1, mask)
    files = [root / f"betas_session{s:02d}.nii.gz" for s in (1, 2, 1)]  # 36 trials, the design has 24
    with pytest.raises(BrainDataError, match="36 trials of betas but the design lists only 24"):
        load_nsd_betas(files, design, 1, mask, run_lengths=RUNS)
    data = np.asarray(nib.load(root / "betas_session01.nii.gz").dataobj).astype(np.float32)
    data[1, 2, 0, 4] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(
        BrainDataError, match=r"1 voxel\(s\) have NaN or inf betas \(first at voxel \(1, 2, 0\)\)"
    ):
        load_nsd_betas([tmp_path / "nan.nii.gz"], design, 1, mask, run_lengths=RUNS)


def test_noise_ceiling_formula():
    ncsnr = np.array([0.0, 0.5, 1.0, 2.0])
    # n = 3: 100 * s^2 / (s^2 + 1/3) written out
    np.testing.assert_allclose(
        noise_ceiling(ncsnr, 3), [0, 100 * 0.25 / (0.25 + 1 / 3), 75, 100 * 4 / (4 + 1 / 3)]
    )


# --- NSD betas as HDF5 ----------------------------------------------------------------------------------

REAL_LIKE = (7, 9, 5)  # (X, Y, Z), all different, as NSD's (81, 104, 83): a wrong axis order cannot pass


def _write_both(folder, betas, name="betas_session01"):
    """``betas`` [trials, X, Y, Z] int16 written as NSD does: NIfTI (X, Y, Z, T), and HDF5 from MATLAB,
    which h5py reads as (T, Z, Y, X)."""
    data = np.moveaxis(betas, 0, -1)
    nib.save(nib.Nifti1Image(data, np.diag([1.8, 1.8, 1.8, 1])), folder / f"{name}.nii.gz")
    with h5py.File(folder / f"{name}.hdf5", "w") as f:
        f.create_dataset("betas", data=data.T, chunks=(1, *data.T.shape[1:]))  # one chunk per trial
    return folder / f"{name}.nii.gz", folder / f"{name}.hdf5"


def _irregular_mask(shape, seed=3):
    mask = np.random.default_rng(seed).random(shape) < 0.3
    mask[1, 1, 1] = mask[-2, -2, -2] = True
    mask[0] = mask[-1] = False  # the bounding box is not the whole volume
    return mask


def test_hdf5_and_nifti_betas_give_identical_voxel_time_series(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    betas = (rng.normal(0, 2, (12, *REAL_LIKE)) * 300).astype(np.int16)
    nii, h5 = _write_both(tmp_path, betas)
    mask = _irregular_mask(REAL_LIKE)
    from_nii = read_session_betas(nii, mask)
    # small blocks: several reads of the mask's bounding box, each a few trials
    monkeypatch.setattr(nsd_module, "HDF5_BLOCK_BYTES", 3 * mask[1:-1].size * 2)
    reads = []
    getitem = h5py.Dataset.__getitem__
    monkeypatch.setattr(
        h5py.Dataset, "__getitem__", lambda ds, key: reads.append(getitem(ds, key)) or reads[-1]
    )
    from_h5 = read_session_betas(h5, mask)
    np.testing.assert_array_equal(from_h5, from_nii)
    # and both are the stored betas / 300 at the mask's voxels, in the mask's (C) order
    np.testing.assert_array_equal(from_nii, betas[:, mask].astype(np.float32) / np.float32(300))
    nz = np.argwhere(mask)
    box = tuple(int(b - a + 1) for a, b in zip(nz.min(0), nz.max(0), strict=True))
    assert len(reads) == 4 and all(r.shape[1:] == box[::-1] for r in reads)  # (t, z, y, x) of the box only
    assert sum(r.shape[0] for r in reads) == 12
    assert session_trials(nii) == session_trials(h5) == 12


def test_load_nsd_betas_is_the_same_from_hdf5_and_nifti(nsd):
    root, *_ = nsd
    mask = _irregular_mask(SHAPE, seed=1)
    mask[2, 1, 1] = True
    design = root / "nsd_expdesign.mat"
    got = {
        ext: load_nsd_betas([root / f"betas_session{s:02d}.{ext}" for s in (1, 2)], design, 1, mask,
                            run_lengths=RUNS)
        for ext in ("nii.gz", "hdf5")
    }  # fmt: skip
    np.testing.assert_array_equal(got["hdf5"].responses, got["nii.gz"].responses)
    np.testing.assert_array_equal(got["hdf5"].voxels, got["nii.gz"].voxels)
    np.testing.assert_array_equal(got["hdf5"].images, got["nii.gz"].images)
    ids = nsd_image_ids([root / "betas_session01.hdf5", root / "betas_session02.nii.gz"],
                        root / "nsd_expdesign.mat", 1)  # fmt: skip
    np.testing.assert_array_equal(ids, got["hdf5"].images)


def test_hdf5_betas_in_the_wrong_axis_order_are_refused(tmp_path):
    betas = np.zeros((4, *REAL_LIKE), np.int16)
    with h5py.File(tmp_path / "b.hdf5", "w") as f:
        f["betas"] = betas  # (T, X, Y, Z): the NIfTI's order, not NSD's (T, Z, Y, X)
    with pytest.raises(
        BrainDataError, match=r"b\.hdf5: /betas has shape \(4, 7, 9, 5\).*\(trials, X, Y, Z\)"
    ):
        read_session_betas(tmp_path / "b.hdf5", np.ones(REAL_LIKE, bool))
    with h5py.File(tmp_path / "c.hdf5", "w") as f:
        f["data"] = betas
    with pytest.raises(BrainDataError, match=r"c\.hdf5 has no dataset '/betas' \(found: data\)"):
        session_trials(tmp_path / "c.hdf5")
    with h5py.File(tmp_path / "d.hdf5", "w") as f:
        f["betas"] = betas[0]
    with pytest.raises(BrainDataError, match=r"d\.hdf5: /betas must be 4-D \(trials, Z, Y, X\)"):
        read_session_betas(tmp_path / "d.hdf5", np.ones(REAL_LIKE, bool))
    with pytest.raises(BrainDataError, match="selects no voxels"):
        read_session_betas(tmp_path / "d.hdf5", np.zeros(REAL_LIKE, bool))


# --- truncated and corrupted files: one line naming the file -------------------------------------------


def _truncate(path, fraction, out=None):
    data = path.read_bytes()
    out = out or path.with_name("cut_" + path.name)
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


def _one_clean_error(excinfo, path):
    """The message names the file, says why and is one line; no reader traceback is chained to it."""
    err = excinfo.value
    assert str(path) in str(err) and "\n" not in str(err)
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return str(err)


@pytest.mark.parametrize("fraction", [0.1, 0.97])  # a broken header; a header intact but data missing
@pytest.mark.parametrize("ext", ["nii.gz", "hdf5"])
def test_truncated_betas(nsd, ext, fraction):
    root, *_ = nsd
    cut = _truncate(root / f"betas_session01.{ext}", fraction)
    with pytest.raises(BrainDataError) as e:
        load_nsd_betas([cut], root / "nsd_expdesign.mat", 1, np.ones(SHAPE, bool), run_lengths=RUNS)
    msg = _one_clean_error(e, cut)
    assert msg.startswith(f"NSD betas file {cut} cannot be read") and "truncated" in msg


@pytest.mark.parametrize("ext", ["nii.gz", "hdf5"])
def test_corrupted_betas_and_their_trial_count(nsd, ext):
    root, *_ = nsd
    bad = root / f"garbage.{ext}"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    for call in (lambda: session_trials(bad), lambda: read_session_betas(bad, np.ones(SHAPE, bool))):
        with pytest.raises(BrainDataError) as e:
            call()
        assert "cannot be read" in _one_clean_error(e, bad)


def test_truncated_design_roi_and_ncsnr_files(nsd):
    root, *_ = nsd
    for fraction in (0.02, 0.5):
        cut = _truncate(root / "nsd_expdesign.mat", fraction)
        with pytest.raises(BrainDataError) as e:
            load_expdesign(cut)
        assert "NSD design file" in _one_clean_error(e, cut) and "nsd_expdesign.mat again" in str(e.value)
    cut = _truncate(root / "prf-visualrois.nii.gz", 0.6)
    with pytest.raises(BrainDataError) as e:
        roi_masks({"prf-visualrois": cut}, ["V1v"])
    assert str(e.value).startswith(f"ROI file (prf-visualrois) {cut} cannot be read")
    _one_clean_error(e, cut)
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), np.eye(4)), root / "ncsnr.nii.gz")
    cut = _truncate(root / "ncsnr.nii.gz", 0.5)
    with pytest.raises(BrainDataError) as e:
        volume_at(cut, np.zeros((1, 3), int), SHAPE, "ncsnr")
    _one_clean_error(e, cut)


def test_roi_files_must_be_3d_volumes_of_one_shape(nsd):
    root, *_ = nsd
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 4), np.int16), np.eye(4)), root / "floc-faces.nii.gz")
    files = {"prf-visualrois": root / "prf-visualrois.nii.gz", "floc-faces": root / "floc-faces.nii.gz"}
    with pytest.raises(
        BrainDataError, match=r"ROI files of different volume shapes: .*\(4, 5, 3\).*\(4, 5, 4\)"
    ):
        roi_masks(files, ["V1v", "FFA-1"])
    with pytest.raises(BrainDataError, match=r"expected a 3-D volume, got shape \(4, 5, 3, 12\)"):
        roi_masks({"prf-visualrois": root / "betas_session01.nii.gz"}, ["V1v"])


# --- the design: 1-based ids only -----------------------------------------------------------------------


def _design(path, order, subjectim, sharedix=(1, 2)):
    savemat(path, {"masterordering": np.asarray(order, np.double)[None],
                   "subjectim": np.asarray(subjectim, np.double),
                   "sharedix": np.asarray(sharedix, np.double)[None]})  # fmt: skip
    return path


def test_design_ids_below_1_are_refused_not_read_as_the_last_image(tmp_path):
    subjectim = np.arange(1, 25).reshape(2, 12)
    order = [1, 2, 3, 12]
    d = load_expdesign(_design(tmp_path / "ok.mat", order, subjectim))
    assert d.trial_images(2, 4).tolist() == [12, 13, 14, 23]  # 0-based ids
    subjectim[1, 2] = 0  # subject 2's third image
    p = _design(tmp_path / "zero.mat", order, subjectim)
    with pytest.raises(BrainDataError, match=r"zero\.mat: subjectim holds ids below 1: 1 entries, the first "
                       r"subjectim\(2, 3\) = 0\. NSD's design is 1-based"):  # fmt: skip
        load_expdesign(p)
    subjectim[1, 2] = 15
    for bad_order, what in (([1, 0, 3], r"masterordering\(1, 2\) = 0"), ([1, 13], r"must be 1\.\.12")):
        with pytest.raises(BrainDataError, match=what):
            load_expdesign(_design(tmp_path / "order.mat", bad_order, subjectim))
    with pytest.raises(BrainDataError, match=r"sharedix holds ids below 1"):
        load_expdesign(_design(tmp_path / "shared.mat", order, subjectim, sharedix=(0, 1)))
    for value in (2.5, np.nan):
        subjectim_f = subjectim.astype(float)
        subjectim_f[0, 0] = value
        with pytest.raises(BrainDataError, match=r"subjectim must hold whole numbers .*subjectim\(1, 1\)"):
            load_expdesign(_design(tmp_path / "frac.mat", order, subjectim_f))
    with pytest.raises(BrainDataError, match="0-based image ids"):  # built by hand, 0-based
        ExpDesign(np.array([0, 1]), np.array([[0, -1]]), np.array([0]))


# --- constant voxels: left out, counted, voxel indices kept aligned -------------------------------------


def test_constant_voxels_are_dropped_with_a_warning_and_voxels_stay_aligned(nsd):
    root, betas, order, subjectim = nsd
    betas = betas.copy()
    betas[:, 0, 0, 0] = 0  # outside the brain: 0 on every trial
    betas[:, 1, 1, 1] = 600  # constant
    betas[:12, 3, 4, 2] = np.repeat([300, -300, 900], RUNS)  # constant within each run of session 1 ...
    betas[12:, 3, 4, 2] = np.repeat([5, 6, 7], RUNS)  # ... and of session 2: z-scored per run to 0
    for s in range(2):
        data = np.moveaxis(betas[12 * s : 12 * (s + 1)], 0, -1)
        with h5py.File(root / f"const{s}.hdf5", "w") as f:
            f["betas"] = data.T
    ncsnr = np.random.default_rng(5).random(SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(ncsnr, np.eye(4)), root / "ncsnr.nii.gz")
    mask = np.ones(SHAPE, bool)
    with pytest.warns(BrainDataWarning, match=r"3 of 60 voxels have constant responses .*first at voxel "
                      r"\(0, 0, 0\).* keep 57 voxels"):  # fmt: skip
        got = load_nsd_betas([root / "const0.hdf5", root / "const1.hdf5"], root / "nsd_expdesign.mat", 2,
                             mask, run_lengths=RUNS)  # fmt: skip
    assert got.dropped.tolist() == [[0, 0, 0], [1, 1, 1], [3, 4, 2]]
    keep = mask.copy()
    keep[0, 0, 0] = keep[1, 1, 1] = keep[3, 4, 2] = False
    np.testing.assert_array_equal(got.voxels, np.argwhere(keep))
    want, _ = _expected(betas, order, subjectim, keep)
    np.testing.assert_allclose(got.responses, want, atol=1e-5)  # each kept column is its own voxel's
    np.testing.assert_array_equal(volume_at(root / "ncsnr.nii.gz", got.voxels, SHAPE), ncsnr[keep])
    # every kept voxel can be matched: none gets the "constant voxel" index -1 downstream
    acts = torch.from_numpy(np.random.default_rng(1).normal(size=(len(got.images), 10)).astype(np.float32))
    _, idx = top_matches(acts, torch.from_numpy(got.responses))
    assert (idx >= 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when no voxel is constant
        clean = load_nsd_betas([root / "const0.hdf5"], root / "nsd_expdesign.mat", 2, keep, run_lengths=RUNS)
    assert len(clean.dropped) == 0 and clean.responses.shape[1] == 57


def test_all_constant_voxels_are_an_error(nsd):
    root, *_ = nsd
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 12), np.int16), np.eye(4)), root / "zeros.nii.gz")
    with pytest.raises(
        BrainDataError, match=r"all 60 voxels of the mask have constant responses .*zeros\.nii\.gz"
    ):
        load_nsd_betas([root / "zeros.nii.gz"], root / "nsd_expdesign.mat", 1, np.ones(SHAPE, bool),
                       run_lengths=RUNS)  # fmt: skip


@pytest.fixture
def algonauts(tmp_path):
    rng = np.random.default_rng(1)
    sub = tmp_path / "subj01"
    fmri = sub / "training_split" / "training_fmri"
    imgs = sub / "training_split" / "training_images"
    masks = sub / "roi_masks"
    for d in (fmri, imgs, masks):
        d.mkdir(parents=True)
    lh, rh = rng.normal(size=(6, 10)).astype(np.float32), rng.normal(size=(6, 7)).astype(np.float32)
    np.save(fmri / "lh_training_fmri.npy", lh)
    np.save(fmri / "rh_training_fmri.npy", rh)
    for i in range(6):
        (imgs / f"train-{i + 1:04d}_nsd-{10 * i:05d}.png").write_bytes(b"")
    np.save(masks / "lh.floc-faces_challenge_space.npy", np.array([0, 1, 1, 2, 0, 0, 3, 2, 0, 0]))
    np.save(masks / "rh.floc-faces_challenge_space.npy", np.array([2, 2, 0, 0, 0, 1, 0]))
    np.save(masks / "mapping_floc-faces.npy", {0: "Unknown", 1: "OFA", 2: "FFA-1", 3: "FFA-2"})  # a pickle
    return sub, lh, rh


def test_algonauts_reads_both_hemispheres_and_rois(algonauts):
    sub, lh, rh = algonauts
    s = load_algonauts(sub, rois=["FFA-1", "OFA"])
    np.testing.assert_array_equal(s.responses, np.hstack([lh, rh]))
    assert s.n_lh == 10 and [p.name[:10] for p in s.images] == [f"train-{i:04d}" for i in range(1, 7)]
    assert np.flatnonzero(s.rois["FFA-1"]).tolist() == [3, 7, 10, 11]
    assert np.flatnonzero(s.rois["OFA"]).tolist() == [1, 2, 15]


def test_algonauts_mappings_need_an_explicit_allow_pickle(algonauts):
    sub, *_ = algonauts
    with pytest.raises(BrainDataError, match=r"pickled object .* pass allow_pickle=True"):
        read_mapping(sub / "roi_masks" / "mapping_floc-faces.npy")
    assert read_mapping(sub / "roi_masks" / "mapping_floc-faces.npy", allow_pickle=True) == {
        1: "OFA", 2: "FFA-1", 3: "FFA-2"}  # fmt: skip
    np.save(sub / "roi_masks" / "mapping_floc-faces.npy", {0: "Unknown", 1: "face-patch-A"})
    s = load_algonauts(sub, rois=["face-patch-A"], allow_pickle=True)  # the subject's own names
    assert np.flatnonzero(s.rois["face-patch-A"]).tolist() == [1, 2, 15]
    assert pickle.loads(pickle.dumps(s.rois))  # plain arrays, nothing custom


def test_algonauts_errors_say_what_is_wrong(algonauts, tmp_path):
    sub, _lh, rh = algonauts
    with pytest.raises(BrainDataError, match="subject folder not found"):
        load_algonauts(tmp_path / "subj09")
    with pytest.raises(BrainDataError, match=r"unknown ROI name\(s\) 'FFA'"):
        load_algonauts(sub, rois=["FFA"])
    fmri = sub / "training_split" / "training_fmri"
    np.save(fmri / "rh_training_fmri.npy", rh[:5])
    with pytest.raises(BrainDataError, match="lh has 6 trials but rh has 5"):
        load_algonauts(sub)
    rh[2, 3] = np.nan
    np.save(fmri / "rh_training_fmri.npy", rh)
    with pytest.raises(BrainDataError, match="1 vertices have NaN or inf responses \\(first: column 13"):
        load_algonauts(sub)
    np.save(fmri / "rh_training_fmri.npy", np.nan_to_num(rh))
    (sub / "training_split" / "training_images" / "train-0001_nsd-00000.png").unlink()
    with pytest.raises(BrainDataError, match="5 training images but 6 trials"):
        load_algonauts(sub)
