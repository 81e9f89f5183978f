"""The paper's numbers and figures from ``sae-brainmap run`` on the tiny synthetic subject (the pipeline
test's config, with the authors' options on: RSA over all voxels, selectivity ranked per layer): each
number against a dense float64 recomputation from the run's own stored activations and responses, the
planted structure where it should show, and the report's sections and figures."""

import json

import numpy as np
import pytest
from _brain_reference import dense_similarity
from test_sae_brainmap_pipeline import TINY, _png_size, _write

from sae_brainmap.pipeline import run_pipeline
from sae_brainmap.run_config import load_run_config

OPTIONS = {
    **TINY,
    "analysis": {**TINY["analysis"], "rsa_max_voxels": None, "selectivity_per_layer": 4},
    # the selectivity figures and the dictionary-activation maps are drawn and tested by the pipeline tests
    "maps": {**TINY["maps"], "images": [], "selectivity_figures": False},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    out = root / "run"
    run_pipeline(
        load_run_config(_write(root / "paper.yaml", {"out": str(out), **OPTIONS})), log=lambda _: None
    )
    numbers = json.loads((out / "analysis" / "numbers.json").read_text())
    with np.load(out / "brain" / "responses.npz") as f:
        brain = {k: f[k] for k in f.files}

    def layers(name):
        with np.load(out / "activations" / name) as f:
            return {int(k.split("_")[1]): f[k].astype(np.float64) for k in f.files}

    models = {"sae": layers("sae_codes.npz"), "neurons": layers("residual_means.npz")}
    dense = {
        m: {lay: dense_similarity(a, brain["responses"]) for lay, a in x.items()} for m, x in models.items()
    }
    return out, numbers, brain, models, dense


def _best(S: np.ndarray) -> np.ndarray:
    """Per voxel the best r over a [U, V] matrix's latents (NaN: none defined)."""
    return np.array([np.nanmax(c) if np.isfinite(c).any() else np.nan for c in S.T])


def test_headline_against_the_runs_own_activations(run):
    out, numbers, brain, _models, dense = run
    roi, h = brain["roi"], numbers["headline"]
    for model in ("sae", "neurons"):
        per_layer = {str(lay): _best(S) for lay, S in dense[model].items()}
        every = np.nanmax(np.stack(list(per_layer.values())), axis=0)
        for key, best in [("all", every), *per_layer.items()]:
            e = h[model]["all_layers"] if key == "all" else h[model]["layers"][key]
            assert e["max"] == pytest.approx(np.nanmax(best), abs=1e-5), (model, key)
            assert e["mean"] == pytest.approx(np.nanmean(best), abs=1e-5), (model, key)
            for q in numbers["rois"]:
                r = h[model]["rois"][q]["all_layers"] if key == "all" else h[model]["rois"][q]["layers"][key]
                assert r["mean"] == pytest.approx(np.nanmean(best[roi == q]), abs=1e-5), (model, key, q)
                assert r["max"] == pytest.approx(np.nanmax(best[roi == q]), abs=1e-5), (model, key, q)
        assert h[model]["all_layers"]["n_voxels"] == numbers["n_voxels"]
    # the SAE's "all layers" maximum is the voxel dictionary's best r, and both models are reported
    d = np.loadtxt(out / "dictionary" / "dictionary.csv", delimiter=",", skiprows=1, usecols=(4, 7))
    assert h["sae"]["all_layers"]["max"] == pytest.approx(d[:, 0].max(), abs=1e-4)
    assert h["neurons"]["all_layers"]["max"] == pytest.approx(d[:, 1].max(), abs=1e-4)
    # on the synthetic subject the voxels follow SAE latents, so the latents beat the raw neurons
    assert h["sae"]["all_layers"]["mean"] > h["neurons"]["all_layers"]["mean"]
    csv = (out / "analysis" / "headline.csv").read_text().splitlines()
    assert csv[0] == "model,layer,roi,max_r,mean_r,n_voxels" and len(csv) == 1 + 2 * 4 * 5


def test_hierarchy_rules_against_dense_per_layer_max_and_mean(run):
    out, numbers, brain, _models, dense = run
    roi, layers = brain["roi"], numbers["layers"]
    with np.load(out / "analysis" / "per_voxel.npz") as f:
        stored = {k: f[k] for k in f.files}
    for rule, reduce in (("max", lambda S: _best(S)), ("mean", lambda S: np.nan_to_num(S).mean(0))):
        scores = np.stack([reduce(dense["sae"][lay]) for lay in layers])
        best = np.asarray(layers)[np.argmax(scores, axis=0)]
        # a voxel whose two best layers are within float32 rounding may go either way
        top2 = np.sort(scores, axis=0)[-2:]
        clear = top2[1] - top2[0] > 1e-5
        np.testing.assert_array_equal(stored[f"best_layer_{rule}"][clear], best[clear])
        for q in numbers["rois"]:
            counts = [int(((best == lay) & (roi == q)).sum()) for lay in layers]
            got = numbers["hierarchy"][rule]["roi_layer_counts"][q]
            assert sum(got) == sum(counts) and np.abs(np.subtract(got, counts)).sum() <= 2 * (~clear).sum()


def test_latent_to_voxel_mapping_against_a_direct_count_and_the_planted_latents(run):
    out, numbers, brain, _models, dense = run
    roi, layers, rois = brain["roi"], numbers["layers"], numbers["rois"]
    m = numbers["latent_mapping"]
    with np.load(out / "analysis" / "per_voxel.npz") as f:
        density = f["latent_density_layers"]
    for j, lay in enumerate(layers):
        S = dense["sae"][lay]
        live = np.isfinite(S).any(1)
        best = np.array([np.nanargmax(row) for row in S[live]])
        np.testing.assert_array_equal(density[j], np.bincount(best, minlength=S.shape[1]))
        for q in rois:
            assert m["roi_layer_counts"][q][j] == int((roi[best] == q).sum())
        assert m["no_best_voxel"][j] == int((~live).sum())
    # where it should show: a planted latent drives its ROI's voxels, so its best voxel lies in that ROI
    homes: dict[tuple[int, int], set] = {}
    for lay, u, q in zip(brain["planted_layer"], brain["planted_latent"], roi, strict=True):
        homes.setdefault((int(lay), int(u)), set()).add(str(q))  # two ROIs may share a planted latent
    home = [roi[np.nanargmax(dense["sae"][lay][u])] in qs for (lay, u), qs in homes.items()]
    assert np.mean(home) > 0.9, f"{sum(home)} of {len(home)} planted latents have their best voxel at home"
    assert _png_size(out / "analysis" / "latent_counts.png")[0] > 800
    rows = (out / "analysis" / "latent_roi_layer_counts.csv").read_text().splitlines()
    assert rows[0] == "roi," + ",".join(f"layer_{lay}" for lay in layers) and len(rows) == 1 + len(rois) + 2


def test_mean_rule_map_and_density_map_are_drawn_beside_the_max_rule_one(run):
    out, numbers, _brain, _models, _dense = run
    report = (out / "report.md").read_text()
    maps = json.loads((out / "maps" / "maps.json").read_text())["maps"]
    assert maps == ["best_layer.png", "best_layer_mean.png", "max_r.png", "latent_density.png"]
    for png in maps:
        assert (out / "maps" / png).stat().st_size > 10_000 and f"(maps/{png})" in report
    for section in ("## Headline: SAE latents vs raw neurons", "## Latent -> voxel mapping",
                    "## ROI-consistent selectivity per layer", "(analysis/latent_counts.png)"):  # fmt: skip
        assert section in report
    # the headline table quotes the numbers
    h = numbers["headline"]
    assert (
        f"| **all** | **{h['sae']['all_layers']['max']:.3f}** | {h['sae']['all_layers']['mean']:.3f} |"
        in report
    )


def test_the_authors_options_rsa_over_all_voxels_and_per_layer_selectivity(run):
    out, numbers, brain, _models, dense = run
    assert numbers["rsa"]["n_voxels"] == numbers["n_voxels"] == brain["responses"].shape[1]
    roi = brain["roi"]
    sel = numbers["selectivity_per_layer"]
    for q in numbers["rois"]:
        for lay in numbers["layers"]:
            mean_r = np.nan_to_num(dense["sae"][lay][:, roi == q]).mean(1)
            ref = sorted(range(len(mean_r)), key=lambda u: (-mean_r[u], u))[:4]
            assert [e["latent"] for e in sel[q][str(lay)]] == ref
            np.testing.assert_allclose([e["mean_r"] for e in sel[q][str(lay)]], mean_r[ref], atol=1e-9)
    rows = (out / "analysis" / "selectivity_per_layer.csv").read_text().splitlines()
    assert len(rows) == 1 + len(numbers["rois"]) * len(numbers["layers"]) * 4
