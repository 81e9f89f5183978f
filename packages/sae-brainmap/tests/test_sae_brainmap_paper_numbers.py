"""The paper's own numbers on small random data, each against an independent dense float64 computation: the
streamed per-layer statistics (per voxel: max and mean r over latents; per latent: its best voxel), the
headline (max and mean over voxels, SAE vs neurons), the latent -> voxel counts, the per-layer selectivity
ranking, the chance level; and the options (NSD's subject-unique images, RSA over all voxels)."""

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from _brain_reference import dense_similarity
from scipy.io import savemat

from sae_brainmap.analysis import (
    headline,
    latent_mapping,
    layer_r,
    layer_scores,
    layer_similarity,
    load_similarity_stats,
    roi_selectivity_per_layer,
    save_similarity_stats,
    similarity_stats,
)
from sae_brainmap.analysis.similarity_stats import chance_best_r, headline_rows
from sae_brainmap.brain import load_expdesign, load_nsd_betas, nsd_image_ids
from sae_brainmap.dictionary import build_voxel_dictionary
from sae_brainmap.run_config import RunConfig, RunConfigError, _validate_counts


def _data(seed=0, n=50, u=37, v=45):
    """Activations with a constant latent, a duplicated latent (an exact tie), a latent tracking voxel 9;
    responses with a constant voxel, a duplicated voxel, voxels following latents. The duplicates sit
    at the same place within chunks of 4 and of 7 (0 and 28; 7 and 35), so that their float32 tiles are
    bitwise equal too and the tie is a tie for the streamed pass as for the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(n, u, generator=g))
    b = torch.randn(n, v, generator=g)
    b[:, :6] += 2 * acts[:, 10:16]  # voxels 0..5 follow latents 10..15
    b[:, 8] += 2 * acts[:, 0]  # voxel 8 follows latent 0
    b[:, 7] += 4 * acts[:, 20]  # voxel 7 follows latent 20 closely
    acts[:, 4] = 0.7  # a constant (dead) latent
    acts[:, 28] = acts[:, 0]  # latent 28 ties latent 0 everywhere
    b[:, 20] = 3.0  # a constant voxel
    b[:, 35] = b[:, 7]  # voxel 35 ties voxel 7 everywhere
    acts[:, 25] = b[:, 9] + 0.1 * torch.randn(n, generator=g)  # latent 25's best voxel is 9
    return acts, b


def _first_argmax(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Max and first argmax along ``axis`` ignoring NaN; (0, -1) where a line is all NaN."""
    filled = np.where(np.isnan(x), -np.inf, x)
    idx = filled.argmax(axis)
    val = filled.max(axis)
    none = np.isinf(val)
    return np.where(none, 0.0, val), np.where(none, -1, idx)


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("chunk", [7, 2048])
def test_streamed_layer_statistics_match_the_dense_float64_matrix(centered, chunk):
    acts, b = _data()
    if not centered:
        acts[:, 4] = 0.0  # for cosine, only an all-zero column has no similarity
        b[:, 20] = 0.0
    s = layer_similarity(acts, b, centered=centered, chunk=chunk)
    S = dense_similarity(acts.numpy(), b.numpy(), centered=centered)  # [U, V], NaN where undefined
    v_max, v_arg = _first_argmax(S, 0)
    u_max, u_arg = _first_argmax(S, 1)
    np.testing.assert_allclose(s.voxel_max.numpy(), v_max, atol=1e-5)
    np.testing.assert_array_equal(s.voxel_argmax.numpy(), v_arg)
    np.testing.assert_allclose(s.latent_max.numpy(), u_max, atol=1e-5)
    np.testing.assert_array_equal(s.latent_argmax.numpy(), u_arg)
    # the mean over all U latents, a latent without a similarity counting as 0 (the authors' 1e-8 norm)
    np.testing.assert_allclose(s.voxel_mean.numpy(), np.nan_to_num(S, nan=0.0).mean(0), atol=1e-6)
    # the planted facts, spelled out
    assert s.voxel_argmax[20] == -1 and s.voxel_max[20] == 0 and s.voxel_mean[20] == 0
    assert s.latent_argmax[4] == -1 and s.latent_max[4] == 0
    assert int(s.voxel_argmax[8]) == 0  # latents 0 and 28 tie for voxel 8: the smaller one
    assert 28 not in s.voxel_argmax.tolist()
    assert int(s.latent_argmax[28]) == int(s.latent_argmax[0])
    assert 35 not in s.latent_argmax.tolist()  # voxel 35 ties voxel 7: the smaller one wins
    assert int(s.latent_argmax[20]) == 7  # ... and voxel 7 is latent 20's best
    if centered:
        assert int(s.latent_argmax[25]) == 9


def test_statistics_round_trip_and_drive_the_dictionary_and_the_hierarchy(tmp_path):
    acts, b = _data(1)
    acts[:, 28] = torch.rand(50)  # no exact tie across layers here: float32 need not round both alike
    layers = {0: acts[:, :20], 3: acts[:, 20:], 7: torch.relu(torch.randn(50, 12))}
    stats = similarity_stats(layers, b, chunk=5)
    save_similarity_stats(tmp_path / "s.npz", stats)
    back = load_similarity_stats(tmp_path / "s.npz")
    for lay in layers:
        for f in dataclasses.fields(stats[lay]):
            assert torch.equal(getattr(stats[lay], f.name), getattr(back[lay], f.name)), (lay, f.name)
    # the dictionary built from the streamed statistics is the one built by its own top_matches pass
    from_stats = build_voxel_dictionary(layers, b, similarity=back)
    own = build_voxel_dictionary(layers, b)
    assert torch.equal(from_stats.layer, own.layer) and torch.equal(from_stats.latent, own.latent)
    torch.testing.assert_close(from_stats.r, own.r, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_stats.activations, own.activations)
    # the hierarchy's layer scores: the same numbers as layer_r's own passes (topk / a float64 matvec)
    for rule in ("max", "mean"):
        np.testing.assert_allclose(layer_scores(back, rule), layer_r(layers, b, rule=rule), atol=1e-5)
    with pytest.raises(ValueError, match="similarity covers layers"):
        build_voxel_dictionary({0: layers[0]}, b, similarity=back)


def _dense_best(layers: dict, b: torch.Tensor) -> dict[str, np.ndarray]:
    """Per voxel the best r within each layer and over all layers, NaN where undefined, by loops."""
    per_layer = {}
    for lay, a in layers.items():
        S = dense_similarity(a.numpy(), b.numpy())
        per_layer[str(lay)] = np.array([np.nanmax(col) if np.isfinite(col).any() else np.nan for col in S.T])
    stacked = np.stack(list(per_layer.values()))
    per_layer["all"] = np.array(
        [np.nanmax(c) if np.isfinite(c).any() else np.nan for c in stacked.T]
    )  # fmt: skip
    return per_layer


def test_headline_is_the_max_and_mean_over_voxels_of_each_voxels_best_r():
    acts, b = _data(2)
    g = torch.Generator().manual_seed(5)
    models = {
        "sae": {0: acts[:, :20], 5: acts[:, 20:]},
        "neurons": {0: torch.randn(50, 8, generator=g), 5: torch.randn(50, 8, generator=g)},
    }
    roi = np.array(["V1"] * 15 + ["FFA"] * 20 + [""] * 10)
    h = headline({m: similarity_stats(x, b, chunk=6) for m, x in models.items()}, roi, ["V1", "FFA", "PPA"])
    for model, layer_acts in models.items():
        best = _dense_best(layer_acts, b)
        for key, values in best.items():
            got = h[model]["all_layers"] if key == "all" else h[model]["layers"][key]
            ok = values[np.isfinite(values)]
            assert got["n_voxels"] == len(ok) == 44  # the constant voxel 20 is left out
            assert got["max"] == pytest.approx(ok.max(), abs=1e-5)
            assert got["mean"] == pytest.approx(ok.mean(), abs=1e-5)
            for name in ("V1", "FFA"):
                sel = values[(roi == name) & np.isfinite(values)]
                e = h[model]["rois"][name]["all_layers" if key == "all" else "layers"]
                e = e if key == "all" else e[key]
                assert e["max"] == pytest.approx(sel.max(), abs=1e-5)
                assert e["mean"] == pytest.approx(sel.mean(), abs=1e-5)
                assert e["n_voxels"] == len(sel)
        assert h[model]["rois"]["PPA"]["all_layers"] == {"max": None, "mean": None, "n_voxels": 0}
    rows = headline_rows(h)
    assert ["sae", "all", "all", h["sae"]["all_layers"]["max"], h["sae"]["all_layers"]["mean"], 44] in rows
    assert len(rows) == 2 * (1 + 2) * (1 + 3)  # models x (all + 2 layers) x (all voxels + 3 ROIs)


def test_latent_to_voxel_counts_against_a_direct_count():
    acts, b = _data(3)
    layers = {2: acts[:, :19], 9: acts[:, 19:]}
    roi = np.array(["V1"] * 12 + ["V2"] * 18 + ["other"] * 15)
    rois = ["V1", "V2", "FFA"]
    m = latent_mapping(similarity_stats(layers, b, chunk=4), roi, rois)
    counts = np.zeros((3, 2), int)
    density = np.zeros((2, 45), int)
    outside, dead = np.zeros(2, int), np.zeros(2, int)
    for j, lay in enumerate((2, 9)):
        S = dense_similarity(layers[lay].numpy(), b.numpy())
        for k in range(S.shape[0]):  # one latent at a time: its best voxel
            row = S[k]
            if not np.isfinite(row).any():
                dead[j] += 1
                continue
            v = int(np.nanargmax(row))
            density[j, v] += 1
            if roi[v] in rois:
                counts[rois.index(roi[v]), j] += 1
            else:
                outside[j] += 1
    np.testing.assert_array_equal(m.roi_layer_counts, counts)
    np.testing.assert_array_equal(m.density, density)
    np.testing.assert_array_equal(m.outside, outside)
    np.testing.assert_array_equal(m.unassigned, dead)
    assert dead.tolist() == [1, 0]  # the constant latent 4 lives in layer 2
    assert counts.sum() + outside.sum() + dead.sum() == 37
    n = m.numbers()
    assert n["roi_layer_counts"]["V2"] == counts[1].tolist() and n["roi_layer_counts"]["FFA"] == [0, 0]
    np.testing.assert_allclose(n["uniform_expectation"]["V1"], (np.array([19, 18]) - dead) * 12 / 45)
    assert n["max_latents_per_voxel"] == density.sum(0).max()


def test_per_layer_selectivity_ranks_each_layers_latents_by_mean_r_over_the_roi():
    acts, b = _data(4)
    layers = {1: acts[:, :18], 6: acts[:, 18:]}
    roi = np.array(["FFA"] * 20 + ["V1"] * 25)
    got = roi_selectivity_per_layer(layers, b, roi, ["FFA", "V1", "PPA"], top_latents=4)
    assert got["PPA"] == {}
    for name in ("FFA", "V1"):
        for lay, a in layers.items():
            S = np.nan_to_num(dense_similarity(a.numpy(), b.numpy()), nan=0.0)[:, roi == name]
            mean_r = S.mean(1)
            ref = sorted(range(len(mean_r)), key=lambda u: (-mean_r[u], u))[:4]
            assert [u for u, _ in got[name][lay]] == ref
            np.testing.assert_allclose([m for _, m in got[name][lay]], mean_r[ref], atol=1e-9)


def test_chance_best_r_is_the_best_r_of_independent_noise():
    rng = np.random.default_rng(0)
    n, k, v = 60, 400, 300
    a = rng.standard_normal((n, k))
    b = rng.standard_normal((n, v))
    best = np.nanmax(dense_similarity(a, b), axis=0)  # each noise voxel's best r over k noise latents
    assert chance_best_r(k, n) == pytest.approx(best.mean(), rel=0.05)
    assert chance_best_r(12288, 9000) < chance_best_r(12288, 100)
    assert chance_best_r(12288, 500) > chance_best_r(768, 500)
    assert chance_best_r(0, 100) is None


# -------------------------------------------------------------------------------------------- options


def _nsd(tmp_path, n_img=10, shared=(3, 7, 8)):
    """Two sessions of 15 trials (z-scored per session), 10 images, ids 3, 7 and 8 shared."""
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(n_img) for _ in range(3)])  # 30 trials, 3 repeats
    ids = np.arange(n_img) + 0  # NSD ids 0..9 for subject 1
    subjectim = np.tile(ids + 1, (8, 1))
    savemat(tmp_path / "nsd_expdesign.mat", {"masterordering": (order + 1)[None].astype(np.double),
            "subjectim": subjectim.astype(np.double),
            "sharedix": (np.asarray(shared) + 1)[None].astype(np.double)})  # fmt: skip
    shape = (3, 4, 2)
    betas = (rng.normal(0, 2, (30, *shape)) * 300).astype(np.int16)
    for s in range(2):
        data = np.moveaxis(betas[15 * s : 15 * (s + 1)], 0, -1)
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"betas_session{s + 1:02d}.nii.gz")
    roi = np.full(shape, 1, np.int16)
    nib.save(nib.Nifti1Image(roi, np.eye(4)), tmp_path / "prf-visualrois.nii.gz")
    return tmp_path, np.asarray(shared)


def _nsd_config(root, images: str) -> RunConfig:
    c = RunConfig()
    c.images.source, c.images.path = "nsd", str(root / "stimuli.hdf5")
    c.brain.kind = "nsd"
    n = c.brain.nsd
    n.betas = [str(root / f"betas_session{s:02d}.nii.gz") for s in (1, 2)]
    n.expdesign, n.roi_files, n.rois = str(root / "nsd_expdesign.mat"), {"prf-visualrois": str(
        root / "prf-visualrois.nii.gz")}, ["V1v"]  # fmt: skip
    n.zscore_by, n.images = "session", images
    return c


def test_nsd_subject_unique_images_leave_out_the_shared_ids(tmp_path):
    from sae_brainmap import pipeline

    root, shared = _nsd(tmp_path)
    sessions = [root / "betas_session01.nii.gz", root / "betas_session02.nii.gz"]
    design = load_expdesign(root / "nsd_expdesign.mat")
    np.testing.assert_array_equal(design.sharedix, shared)
    every = nsd_image_ids(sessions, design, 1)
    unique = nsd_image_ids(sessions, design, 1, images="unique")
    only_shared = nsd_image_ids(sessions, design, 1, images="shared")
    assert every.tolist() == list(range(10))
    assert unique.tolist() == [i for i in range(10) if i not in shared]
    assert only_shared.tolist() == sorted(shared)
    with pytest.raises(ValueError, match="which must be one of"):
        design.image_set(every, "test")
    # the pipeline's rows: the stimuli it reads and the brain stage's responses are the unique images
    full = load_nsd_betas(sessions, design, 1, np.ones((3, 4, 2), bool), zscore_by="session")
    for images, ids in (("all", every), ("unique", unique), ("shared", only_shared)):
        c = _nsd_config(root, images)
        np.testing.assert_array_equal(pipeline._nsd_image_ids(c), ids)
        assert pipeline._count_images(c) == len(ids)
        out = tmp_path / f"brain_{images}"
        out.mkdir()
        pipeline._nsd_brain(c, tmp_path, out, log=lambda _: None)
        with np.load(out / "responses.npz") as f:
            np.testing.assert_array_equal(f["nsd_images"], ids)
            rows = np.isin(full.images, ids)  # the same z-scored, repeat-averaged responses, those rows only
            np.testing.assert_allclose(f["responses"], full.responses[rows])
            np.testing.assert_array_equal(f["n_repeats"], full.n_repeats[rows])
    # the option changes what the activations stage reads, so it is part of that stage's hash
    sections = {i: pipeline._section(_nsd_config(root, i), "activations") for i in ("all", "unique")}
    assert sections["all"] != sections["unique"]


def test_rsa_max_voxels_null_means_every_voxel_and_other_values_are_checked(tmp_path):
    import yaml

    from sae_brainmap.run_config import load_run_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"analysis": {"rsa_max_voxels": None, "selectivity_per_layer": 100}}))
    c = load_run_config(path)
    assert c.analysis.rsa_max_voxels is None and c.analysis.selectivity_per_layer == 100
    for key, value, msg in (("rsa_max_voxels", 2, "at least 3"), ("selectivity_per_layer", -1, "at least 0")):
        bad = dataclasses.replace(c, analysis=dataclasses.replace(c.analysis, **{key: value}))
        with pytest.raises(RunConfigError, match=f"analysis.{key} must be {msg}"):
            _validate_counts(bad)
    path.write_text(yaml.safe_dump({"brain": {"nsd": {"images": "test"}}}))
    nsd = load_run_config(path)  # checked where brain.kind is nsd
    nsd.brain.kind, nsd.images.source, nsd.images.path = "nsd", "nsd", "x.hdf5"
    nsd.brain.nsd.betas, nsd.brain.nsd.expdesign = ["b.nii.gz"], "d.mat"
    nsd.brain.nsd.roi_files, nsd.brain.nsd.rois = {"prf-visualrois": "r.nii.gz"}, ["V1v"]
    from sae_brainmap.run_config import check_inputs

    with pytest.raises(RunConfigError, match=r"brain\.nsd\.images must be all, unique, shared; got 'test'"):
        check_inputs(nsd)


_MEMORY_PROBE = """
import sys, time, types, torch
# The package's __init__ imports Lightning and timm (about 10 s); this probe needs only the statistics.
pkg = types.ModuleType("sae_brainmap")
pkg.__path__ = [sys.argv[4]]
sys.modules["sae_brainmap"] = pkg
from sae_brainmap.analysis.similarity_stats import layer_similarity
torch.set_num_threads(2)
n, u, v = (int(x) for x in sys.argv[1:4])
layer_similarity(torch.rand(5, 3), torch.rand(5, 2))  # load the libraries first
acts = torch.empty(n, u).uniform_()  # in place: no temporaries
resp = torch.empty(n, v).normal_()
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS watermark (VmHWM) to the current RSS
    f.write("5")
before = status("VmRSS:")
s = layer_similarity(acts, resp)
print(status("VmHWM:") - before, int((s.voxel_argmax >= 0).sum()), int((s.latent_argmax >= 0).sum()))
"""


def test_the_statistics_stream_never_holding_the_similarity_matrix():
    # 12,288 latents as at full size, 4,000 voxels, 100 images: the dense [U, V] float32 matrix alone is
    # 197 MB; the pass holds one 2048 x 2048 tile, N x 2048 normalised columns and O(U + V) results:
    # 21 MB measured (39-56 MB, run to run, while every tile was a fresh allocation)
    import subprocess
    import sys
    from pathlib import Path

    import sae_brainmap.analysis as analysis

    package = str(Path(analysis.__file__).parents[1])
    n, u, v = 100, 12288, 4000
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(n), str(u), str(v), package],
                         capture_output=True, text=True, check=True, timeout=600)  # fmt: skip
    extra, voxels, latents = (int(x) for x in out.stdout.split())
    assert voxels == v and latents == u
    assert extra < 60e6 and extra < u * v * 4 / 3, f"{extra / 1e6:.0f} MB extra"
