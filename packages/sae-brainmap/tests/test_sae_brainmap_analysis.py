"""RSA, hierarchy and encoding analyses against independent computations (scipy, numpy, scikit-learn)."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import r2_score

from sae_brainmap.analysis import best_layer, latents_per_roi, layer_r, ridge_encoding, roi_layer_counts, rsa


def _related(n=60, v=12, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    brain = rng.standard_normal((n, v))
    model = brain + noise * rng.standard_normal((n, v))
    return brain, model


def test_rsa_rho_is_spearman_of_the_upper_triangles():
    brain, model = _related()
    res = rsa(brain, model, permutations=200)
    iu = np.triu_indices(brain.shape[1], k=1)
    ref = spearmanr(np.corrcoef(brain.T)[iu], np.corrcoef(model.T)[iu]).statistic
    assert res.rho == pytest.approx(ref, abs=1e-12)
    assert res.rho > 0.5 and res.p_value < 0.01  # related structure: significant
    unrelated = rsa(brain, np.random.default_rng(9).standard_normal(brain.shape), permutations=200)
    assert abs(unrelated.rho) < 0.3 and unrelated.p_value > 0.05
    assert abs(res.null.mean()) < 0.1  # shuffled voxel labels destroy the structure


def test_rsa_rejects_bad_input():
    brain, model = _related()
    with pytest.raises(ValueError, match="must both be"):
        rsa(brain, model[:, :5])
    model[:, 3] = 1.0
    with pytest.raises(ValueError, match="constant"):
        rsa(brain, model)


def _dense_r(acts, responses):
    a = acts.double().numpy()
    b = responses.double().numpy()
    a = (a - a.mean(0)) / np.linalg.norm(a - a.mean(0), axis=0)
    b = (b - b.mean(0)) / np.linalg.norm(b - b.mean(0), axis=0)
    return a.T @ b  # [U, V]


def test_layer_scores_max_and_mean_rules():
    g = torch.Generator().manual_seed(0)
    acts = {0: torch.randn(40, 7, generator=g), 3: torch.randn(40, 9, generator=g)}
    resp = torch.randn(40, 5, generator=g)
    for rule, reduce in (("max", np.max), ("mean", np.mean)):
        scores = layer_r(acts, resp, rule=rule)
        ref = np.stack([reduce(_dense_r(acts[layer], resp), axis=0) for layer in (0, 3)])
        np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rule"):
        layer_r(acts, resp, rule="median")


def test_best_layer_and_roi_tables():
    scores = np.array([[0.9, 0.1, 0.5, 0.2], [0.1, 0.8, 0.5, 0.3]])  # 2 layers x 4 voxels
    best = best_layer(scores, [2, 7])
    assert best.tolist() == [2, 7, 2, 7]  # voxel 2 ties: the earlier layer
    rois = np.array(["V1", "V1", "FFA", "FFA"])
    assert roi_layer_counts(best, rois, ["V1", "FFA"], [2, 7]).tolist() == [[1, 1], [1, 1]]
    latent = np.array([5, 5, 5, 1])
    layer = np.array([2, 2, 7, 7])
    assert latents_per_roi(layer, latent, rois, ["V1", "FFA"], [2, 7]).tolist() == [[1, 0], [0, 2]]


def test_ridge_encoding_recovers_a_linear_response():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((300, 20))
    w = rng.standard_normal((20, 4))
    resp = feats @ w
    resp[:, 3] = rng.standard_normal(300)  # a voxel the features cannot explain
    resp[:, :3] += 0.3 * rng.standard_normal((300, 3))
    res = ridge_encoding(feats[:200], resp[:200], feats[200:], resp[200:], noise_ceiling_pct=np.full(4, 50.0))
    assert (res.r2[:3] > 0.9).all() and res.r2[3] < 0.05
    np.testing.assert_allclose(res.r2_over_ceiling, res.r2 / 0.5)
    # R^2 against scikit-learn's own metric on the model refitted with the chosen penalties
    from sklearn.linear_model import Ridge

    mean, std = feats[:200].mean(0), feats[:200].std(0) + 1e-12
    for v in range(4):
        ridge = Ridge(alpha=res.alpha[v]).fit((feats[:200] - mean) / std, resp[:200, v])
        ref = r2_score(resp[200:, v], ridge.predict((feats[200:] - mean) / std))
        assert res.r2[v] == pytest.approx(ref, abs=1e-6)


def test_roi_selectivity_ranks_latents_by_mean_r_over_the_roi_and_finds_their_top_images():
    from sae_brainmap.analysis import patch_activation_map, roi_selectivity

    g = torch.Generator().manual_seed(0)
    acts = {2: torch.rand(50, 6, generator=g), 7: torch.rand(50, 4, generator=g)}
    resp = torch.randn(50, 9, generator=g)
    resp[:, :5] += 3 * acts[7][:, 1:2]  # the "FFA" voxels follow latent 1 of layer 7
    resp[:, 5:] += 3 * acts[2][:, 4:5]  # the "V1" voxels follow latent 4 of layer 2
    roi = np.array(["FFA"] * 5 + ["V1"] * 4)
    sel = roi_selectivity(acts, resp, roi, ["FFA", "V1", "PPA"], top_latents=3, top_images=4)
    for name, cols in (("FFA", slice(0, 5)), ("V1", slice(5, 9))):
        dense = {
            (lay, u): _dense_r(acts[lay], resp)[u, cols].mean()
            for lay in (2, 7)
            for u in range(acts[lay].shape[1])
        }
        ref = sorted(dense, key=lambda k: (-dense[k], k))[:3]
        assert [(e.layer, e.latent) for e in sel[name]] == ref
        for e in sel[name]:
            assert e.mean_r == pytest.approx(dense[(e.layer, e.latent)], abs=1e-9)
            assert e.top_images == np.argsort(-acts[e.layer][:, e.latent].numpy(), kind="stable")[:4].tolist()
    assert (sel["FFA"][0].layer, sel["FFA"][0].latent) == (7, 1) and (
        sel["V1"][0].layer,
        sel["V1"][0].latent,
    ) == (2, 4)
    assert sel["PPA"] == []
    codes = torch.arange(12.0).reshape(6, 2)
    np.testing.assert_array_equal(patch_activation_map(codes, 1, (2, 3)), [[1, 3, 5], [7, 9, 11]])
    with pytest.raises(ValueError, match="grid"):
        patch_activation_map(codes, 1, (2, 2))
