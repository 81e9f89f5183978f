import itertools
import pickle

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy.io import savemat
from scipy.stats import zscore as scipy_zscore

from sae_brainmap.brain import (
    BrainDataError,
    load_algonauts,
    load_expdesign,
    load_nsd_betas,
    noise_ceiling,
    read_ctab,
    read_mapping,
    roi_masks,
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
