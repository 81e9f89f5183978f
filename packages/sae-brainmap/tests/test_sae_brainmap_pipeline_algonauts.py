"""``sae-brainmap run`` on an Algonauts 2023 subject: a tiny subject in the real on-disk format, its responses
planted from known (layer, latent) pairs of the run's own backbone and SAEs, run end to end."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sae_brainmap import DEFAULT_BACKBONE, ViTBackbone, make_sae, save_sae
from sae_brainmap.images import to_model_input
from sae_brainmap.pipeline import STAGES, run_pipeline
from sae_brainmap.run_config import RunConfigError, load_run_config
from sae_brainmap.surface import FSAVERAGE5_VERTICES, FSAVERAGE_VERTICES, fsaverage5_inflated

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
N_IMAGES, USED = 40, 36  # images on disk; the run keeps the first 36 (brain.algonauts.max_images)
LAYERS = (0, 5, 11)
PLANTED = {"V1v": 0, "V2v": 5, "FFA-1": 11}  # ROI -> the layer its vertices are planted from
PRF = {"V1v": 1, "V1d": 2, "V2v": 3}  # NSD's prf-visualrois ids
FACES = {"OFA": 1, "FFA-1": 2}  # NSD's floc-faces ids


def _write_images(folder: Path, rng) -> list[Path]:
    """Blocky colour images, named train-NNNN_nsd-XXXXX.png with NSD ids out of order and written in a
    shuffled order, so that neither the NSD id nor the folder listing gives the row order."""
    folder.mkdir(parents=True)
    ids = rng.choice(73_000, N_IMAGES, replace=False)
    paths = [folder / f"train-{i + 1:04d}_nsd-{ids[i]:05d}.png" for i in range(N_IMAGES)]
    for i in rng.permutation(N_IMAGES):
        blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((64, 48), Image.NEAREST).save(paths[i])
    return paths


def _write_saes(folder: Path) -> dict[int, torch.nn.Module]:
    """Random TopK SAEs (a different init per layer, so that layers' latents are not copies)."""
    folder.mkdir(parents=True)
    saes = {}
    for layer in LAYERS:
        saes[layer] = make_sae("topk", 768, 96, init_seed=100 + layer, k=8, layer=layer, tokens="patch")
        save_sae(saes[layer], folder / f"layer_{layer:02d}.safetensors")
    return saes


def _codes_in_row_order(paths: list[Path], saes: dict) -> dict[int, np.ndarray]:
    """Per layer the mean SAE code over patch tokens of each image, images in response-row order: the
    run's random backbone rebuilt from its seed (0) at 32 px, independently of the pipeline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bb = ViTBackbone(DEFAULT_BACKBONE, model_kwargs={"img_size": 32})
    codes: dict[int, list] = {layer: [] for layer in LAYERS}
    for start in range(0, len(paths), 20):  # the run's batch size
        images = [np.asarray(Image.open(p).convert("RGB")) for p in paths[start : start + 20]]
        x = torch.stack([to_model_input(im, bb.img_size, bb.mean, bb.std) for im in images])
        streams = bb(x, list(LAYERS))
        for layer in LAYERS:
            patch = bb.select_tokens(streams[layer], "patch").float()
            with torch.no_grad():
                z = saes[layer].encode(patch.reshape(-1, patch.shape[-1]))
            codes[layer].append(z.reshape(*patch.shape[:2], -1).mean(1))
    return {layer: torch.cat(v).numpy() for layer, v in codes.items()}


def _patch(hemi: str, n: int) -> np.ndarray:
    """The ``n`` fsaverage5 vertices nearest the occipital pole of the inflated surface, nearest first."""
    xyz = np.asarray(fsaverage5_inflated().parts[hemi].coordinates)
    pole = xyz[np.argmin(xyz[:, 1])]
    return np.argsort(((xyz - pole) ** 2).sum(1))[:n]


def _challenge_space(rng) -> dict[str, dict]:
    """Per hemisphere: the fsaverage vertices of the challenge space (a patch at the occipital pole plus a
    few vertices beyond fsaverage5's 10,242, which are not drawn) and their ROI labels. lh: V1v in the
    middle of the patch, V2v around it (with the far vertices), V1d outside; rh: FFA-1, then OFA."""
    far = {h: rng.choice(np.arange(FSAVERAGE5_VERTICES, FSAVERAGE_VERTICES), 12, replace=False) for h in "lr"}
    lh_near, rh_near = _patch("left", 120), _patch("right", 100)
    v1v, v2v, v1d = PRF["V1v"], PRF["V2v"], PRF["V1d"]
    lh_labels = {**dict.fromkeys(lh_near[:40], v1v), **dict.fromkeys(lh_near[40:80], v2v),
                 **dict.fromkeys(lh_near[80:], v1d), **dict.fromkeys(far["l"], v2v)}  # fmt: skip
    rh_labels = {**dict.fromkeys(rh_near[:50], FACES["FFA-1"]), **dict.fromkeys(rh_near[50:], FACES["OFA"]),
                 **dict.fromkeys(far["r"], 0)}  # fmt: skip
    out = {}
    for hemi, labels in (("lh", lh_labels), ("rh", rh_labels)):
        vertices = np.sort(np.fromiter(labels, np.int64))  # challenge columns: increasing vertex order
        out[hemi] = {"vertices": vertices, "labels": np.asarray([labels[v] for v in vertices])}
    return out


def _write_roi_masks(folder: Path, space: dict) -> None:
    """roi_masks/ as Algonauts ships it: per class a label id per challenge-space vertex and a pickled
    mapping, and the 0/1 all-vertices masks over fsaverage's 163,842 vertices."""
    folder.mkdir(parents=True)
    lh, rh = space["lh"], space["rh"]
    classes = {"prf-visualrois": (lh["labels"], np.zeros(len(rh["labels"]), np.int64), PRF),
               "floc-faces": (np.zeros(len(lh["labels"]), np.int64), rh["labels"], FACES)}  # fmt: skip
    for cls, (lh_ids, rh_ids, names) in classes.items():
        np.save(folder / f"lh.{cls}_challenge_space.npy", lh_ids)
        np.save(folder / f"rh.{cls}_challenge_space.npy", rh_ids)
        np.save(folder / f"mapping_{cls}.npy", {0: "Unknown", **{i: n for n, i in names.items()}})
    for hemi in ("lh", "rh"):
        mask = np.zeros(FSAVERAGE_VERTICES, np.int64)
        mask[space[hemi]["vertices"]] = 1
        np.save(folder / f"{hemi}.all-vertices_fsaverage_space.npy", mask)


def _plant(codes: dict, space: dict, rng) -> tuple[np.ndarray, dict]:
    """Responses ``[N, V_lh + V_rh]``: each ROI vertex follows its ROI's planted latent (the most variable
    latent of the planted layer) with a gain and 5% noise, except every fifth, which is noise only."""
    labels = np.concatenate([space["lh"]["labels"], 10 + space["rh"]["labels"]])
    roi_of = {"V1v": PRF["V1v"], "V2v": PRF["V2v"], "FFA-1": 10 + FACES["FFA-1"]}
    responses = rng.normal(size=(N_IMAGES, len(labels)))
    planted = {}
    for roi, layer in PLANTED.items():
        latent = int(np.argmax(codes[layer].std(0)))
        code = (codes[layer][:, latent] - codes[layer][:, latent].mean()) / codes[layer][:, latent].std()
        cols = np.flatnonzero(labels == roi_of[roi])
        signal = cols[np.arange(len(cols)) % 5 != 0]
        gain = rng.uniform(0.5, 2.0, len(signal))
        responses[:, signal] = code[:, None] * gain + 0.05 * responses[:, signal]
        noise = np.setdiff1d(cols, signal)
        planted[roi] = {"layer": layer, "latent": latent, "signal": signal, "noise": noise}
    return responses.astype(np.float32), planted


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("algonauts")
    sub = root / "algonauts_2023" / "subj01"
    paths = _write_images(sub / "training_split" / "training_images", rng)
    saes = _write_saes(root / "saes")
    codes = _codes_in_row_order(paths, saes)
    space = _challenge_space(rng)
    _write_roi_masks(sub / "roi_masks", space)
    responses, planted = _plant(codes, space, rng)
    fmri = sub / "training_split" / "training_fmri"
    fmri.mkdir(parents=True)
    n_lh = len(space["lh"]["vertices"])
    np.save(fmri / "lh_training_fmri.npy", responses[:, :n_lh])
    np.save(fmri / "rh_training_fmri.npy", responses[:, n_lh:])
    return {"root": root, "sub": sub, "codes": codes, "space": space, "responses": responses,
            "planted": planted, "n_lh": n_lh}  # fmt: skip


def _config(subject: dict, out: Path, **changes) -> dict:
    algonauts = {"subject_dir": str(subject["sub"]), "rois": ["V1v", "V2v"], "roi_classes": [],
                 "max_images": USED, **changes}  # fmt: skip
    return {
        "out": str(out),
        "images": {"source": "algonauts", "batch_size": 20},
        "backbone": {"img_size": 32, "layers": list(LAYERS)},  # 4 patch tokens per image
        "sae": {"checkpoints": str(subject["root"] / "saes"), "kind": "topk", "n_latents": 96, "k": 8},
        "brain": {"kind": "algonauts", "algonauts": algonauts},
        "analysis": {"rsa_permutations": 99, "selectivity_latents": 1, "selectivity_images": 3},
        "maps": {"images": [0, 38], "subject": None, "views": ["lateral"]},  # 38: past the 36 images used
    }


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def run(subject):
    out = subject["root"] / "run"
    cfg = _write(subject["root"] / "algonauts.yaml", _config(subject, out, rois=["V1v", "V2v", "FFA-1"]))
    logs: list[str] = []
    status = run_pipeline(load_run_config(cfg), log=logs.append)
    return out, cfg, status, logs


def _kept_columns(subject) -> np.ndarray:
    """Challenge-space columns of the vertices in V1v, V2v or FFA-1 (what ``vertices: rois`` keeps)."""
    lh, rh = subject["space"]["lh"]["labels"], subject["space"]["rh"]["labels"]
    in_rois = np.concatenate([np.isin(lh, [PRF["V1v"], PRF["V2v"]]), rh == FACES["FFA-1"]])
    return np.flatnonzero(in_rois)


def test_algonauts_run_completes_and_reads_images_in_response_row_order(subject, run):
    out, _cfg, status, logs = run
    assert status == dict.fromkeys(STAGES, "ran")
    with np.load(out / "activations" / "sae_codes.npz") as f:
        for layer in LAYERS:  # the images went through in row order: the codes of the first 36 rows
            np.testing.assert_allclose(f[f"layer_{layer:02d}"], subject["codes"][layer][:USED], atol=1e-5)
    with np.load(out / "brain" / "responses.npz") as f:
        np.testing.assert_array_equal(f["vertices"], _kept_columns(subject))
        np.testing.assert_array_equal(f["responses"], subject["responses"][:USED, f["vertices"]])
        assert f["roi_names"].tolist() == ["V1v", "V2v", "FFA-1"] and set(f["roi"]) == set(PLANTED)
        assert np.isnan(f["ncsnr"]).all()
    assert any("no noise ceiling" in line for line in logs)
    assert any("image 38 out of range (36 images)" in line for line in logs)
    assert not any("do not reproduce" in line for line in logs)  # selectivity maps: same images, same order


def test_algonauts_dictionary_recovers_the_planted_latents_and_equals_a_dense_computation(subject, run):
    out, *_ = run
    with np.load(out / "dictionary" / "sae_dictionary.npz") as f:
        dictionary = {k: f[k] for k in f.files}
    with np.load(out / "brain" / "responses.npz") as f:
        kept, responses = f["vertices"], f["responses"].astype(np.float64)
    column = {c: i for i, c in enumerate(kept)}  # challenge-space column -> the run's vertex index
    with np.load(out / "activations" / "sae_codes.npz") as f:
        codes = [(layer, f[f"layer_{layer:02d}"].astype(np.float64)) for layer in LAYERS]
    for p in subject["planted"].values():
        found = [(dictionary["layer"][column[c]], dictionary["latent"][column[c]]) for c in p["signal"]]
        assert found == [(p["layer"], p["latent"])] * len(p["signal"])
    # a few vertices, planted and noise-only, against Pearson r over every (layer, latent) in numpy
    picks = [column[c] for p in subject["planted"].values() for c in (p["signal"][0], p["noise"][0])]
    for v in picks:
        b = responses[:, v] - responses[:, v].mean()
        best = (-np.inf, -1, -1)
        for layer, a in codes:
            a = a - a.mean(0)
            norm = np.linalg.norm(a, axis=0) * np.linalg.norm(b)
            r = np.where(norm > 0, a.T @ b / np.where(norm > 0, norm, 1), -np.inf)
            if r.max() > best[0]:
                best = (r.max(), layer, int(np.argmax(r)))
        r_best, layer, latent = best
        assert (dictionary["layer"][v], dictionary["latent"][v]) == (layer, latent)
        assert dictionary["r"][v] == pytest.approx(r_best, abs=1e-5)
        np.testing.assert_allclose(dictionary["activations"][:, v], dict(codes)[layer][:, latent], rtol=1e-6)


def test_algonauts_fsaverage_maps_are_drawn_and_linked_and_the_ceiling_is_reported_unavailable(subject, run):
    out, *_ = run
    report = (out / "report.md").read_text()
    names = ["fsaverage_best_layer.png", "fsaverage_best_layer_mean.png", "fsaverage_max_r.png",
             "fsaverage_latent_density.png", "fsaverage_activation_image_0000.png"]  # fmt: skip
    assert json.loads((out / "maps" / "maps.json").read_text())["maps"] == names
    for name in names:
        with Image.open(out / "maps" / name) as png:
            assert png.format == "PNG" and min(png.size) > 300
        assert f"(maps/{name})" in report
    assert "(activations/stimulus_0000.png)" in report and "fsaverage_activation_image_0038" not in report
    # what was drawn: the dictionary's r at the kept vertices' fsaverage indices, NaN everywhere else
    lh_all, rh_all = subject["space"]["lh"]["vertices"], subject["space"]["rh"]["vertices"]
    on_fsaverage = np.concatenate([lh_all, FSAVERAGE_VERTICES + rh_all])[_kept_columns(subject)]
    with np.load(out / "dictionary" / "sae_dictionary.npz") as f:
        r = f["r"]
    with np.load(out / "maps" / "fsaverage_maps.npz") as f:
        both = np.concatenate([f["max_r_lh"], f["max_r_rh"]])
        assert f["best_layer_lh"].shape == (FSAVERAGE_VERTICES,)
    np.testing.assert_array_equal(both[on_fsaverage], r)
    assert np.isnan(np.delete(both, on_fsaverage)).all()
    numbers = json.loads((out / "analysis" / "numbers.json").read_text())
    assert numbers["encoding"]["median_r2_over_ceiling"] is None
    assert "No noise ceiling (Algonauts 2023's training split" in report
    assert "## Not available for this data" in report and "planted latents" in report
    assert f"{len(r)} challenge-space vertices in 3 ROIs" in report


def test_algonauts_rerun_skips_and_a_missing_fsaverage_mask_gives_a_note(subject, run):
    out, cfg, _status, _logs = run
    status = run_pipeline(load_run_config(cfg), log=lambda _: None)
    assert status == dict.fromkeys(STAGES, "skipped")
    mask = subject["sub"] / "roi_masks" / "lh.all-vertices_fsaverage_space.npy"
    shutil.move(mask, mask.with_suffix(".moved"))
    logs: list[str] = []
    status = run_pipeline(load_run_config(cfg), log=logs.append)
    assert [s for s in STAGES if status[s] == "ran"] == ["maps", "report"]
    assert any("fsaverage maps skipped: challenge-space mask not found" in line for line in logs)
    report = (out / "report.md").read_text()
    assert "*No fsaverage maps: challenge-space mask not found:" in report
    assert "(maps/fsaverage_" not in report
    assert not list((out / "maps").glob("fsaverage_*"))
    assert "(maps/selectivity_FFA-1.png)" in report  # the rest of the maps stage still ran


def test_algonauts_vertices_all_keeps_the_whole_challenge_space(subject, tmp_path):
    cfg = _config(subject, tmp_path / "all", rois=["V1v", "FFA-1"], vertices="all")
    cfg["maps"] = {"enabled": False, "selectivity_figures": False}
    logs: list[str] = []
    status = run_pipeline(load_run_config(_write(tmp_path / "all.yaml", cfg)), log=logs.append)
    assert status == dict.fromkeys(STAGES, "ran") and any("fsaverage maps disabled" in line for line in logs)
    lh, rh = subject["space"]["lh"]["labels"], subject["space"]["rh"]["labels"]
    v1v, ffa = np.where(lh == PRF["V1v"], "V1v", ""), np.where(rh == FACES["FFA-1"], "FFA-1", "")
    expected = np.concatenate([v1v, ffa])
    with np.load(tmp_path / "all" / "brain" / "responses.npz") as f:
        np.testing.assert_array_equal(f["vertices"], np.arange(len(lh) + len(rh)))
        np.testing.assert_array_equal(f["roi"], expected)  # V2v, V1d, OFA and the far rh vertices: ""
    numbers = json.loads((tmp_path / "all" / "analysis" / "numbers.json").read_text())
    assert numbers["n_voxels"] == len(expected) and numbers["roi_voxels"] == {"V1v": 40, "FFA-1": 50}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"subject_dir": None}, "brain.kind algonauts needs brain.algonauts.subject_dir"),
        ({"rois": ["FFA"]}, r"brain.algonauts: unknown ROI name\(s\) 'FFA'; available: .*FFA-1"),
        ({"rois": [], "roi_classes": ["floc-face"]}, r"unknown ROI class\(es\) 'floc-face'; available: "),
        ({"rois": []}, "brain.kind algonauts needs ROIs"),
        ({"vertices": "cortex"}, "brain.algonauts.vertices must be rois or all"),
        ({"max_images": 0}, "brain.algonauts.max_images must be at least 1"),
        ({"max_images": "ten"}, r"brain.algonauts.max_images: Does not validate .*Given value: ten"),
        ({"subjectdir": "x"}, "unknown key 'subjectdir' in section 'brain.algonauts'.*allowed: subject_dir"),
    ],
)
def test_algonauts_config_errors_are_one_clear_message(subject, tmp_path, change, message):
    cfg = _config(subject, tmp_path / "out")
    cfg["brain"]["algonauts"].update(change)
    with pytest.raises(RunConfigError, match=message):
        load_run_config(_write(tmp_path / "bad.yaml", cfg))


def test_algonauts_missing_data_fails_before_any_stage(subject, tmp_path):
    missing = _config(subject, tmp_path / "out", subject_dir=str(tmp_path / "subj09"))
    with pytest.raises(RunConfigError, match=r"brain.algonauts.subject_dir: no such folder: .*subj09"):
        run_pipeline(load_run_config(_write(tmp_path / "a.yaml", missing)), log=lambda _: None)
    bodies = _config(subject, tmp_path / "out", roi_classes=["floc-bodies"])
    with pytest.raises(RunConfigError, match=r"lacks the floc-bodies ROI mask: .*lh\.floc-bodies_challenge"):
        run_pipeline(load_run_config(_write(tmp_path / "b.yaml", bodies)), log=lambda _: None)
    assert not (tmp_path / "out").exists()
    mixed = _config(subject, tmp_path / "out")
    mixed["images"] = {"source": "embedded"}
    with pytest.raises(RunConfigError, match=r"brain\.kind algonauts and images\.source algonauts go"):
        load_run_config(_write(tmp_path / "c.yaml", mixed))


def test_roi_classes_expand_to_their_rois_after_the_named_ones(subject, tmp_path):
    from sae_brainmap.run_config import algonauts_rois

    cfg = _config(subject, tmp_path / "out", rois=["FFA-1", "V1v"], roi_classes=["prf-visualrois"])
    config = load_run_config(_write(tmp_path / "c.yaml", cfg))
    expected = ["FFA-1", "V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"]  # named first, each once
    assert algonauts_rois(config.brain.algonauts) == expected


def test_shipped_algonauts_config_is_valid():
    c = load_run_config(CONFIGS / "algonauts_subj01.yaml")
    assert c.brain.kind == "algonauts" and c.images.source == "algonauts"
    assert c.brain.algonauts.subject_dir.endswith("subj01") and c.brain.algonauts.roi_classes
    assert c.sae.checkpoints is not None and c.backbone.checkpoint is not None and c.maps.enabled
