"""``sae-brainmap run``: the pipeline end to end on a tiny config, its resumable stages, and config checks."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sae_brainmap.cli import main
from sae_brainmap.pipeline import STAGES, run_pipeline
from sae_brainmap.run_config import RunConfigError, load_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

TINY = {
    "images": {"source": "embedded", "n_images": 40, "batch_size": 20},
    "backbone": {"img_size": 32, "layers": [0, 5, 11]},  # 4 patch tokens per image
    "sae": {"kind": "topk", "n_latents": 96, "k": 8, "steps": 15, "batch_size": 160},
    "brain": {"kind": "synthetic", "synthetic": {"rois": ["V1", "V2", "FFA", "PPA"]}},
    "analysis": {"rsa_permutations": 99, "rsa_max_voxels": 300},
    "maps": {"images": [0, 3]},
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _files(out: Path) -> dict[str, tuple[int, bytes]]:
    return {
        p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
        for p in out.rglob("*")
        if p.is_file() and p.name != "config.json"
    }


def _finite(x) -> bool:
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return True


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    out = root / "run"
    cfg = _write(root / "tiny.yaml", {"out": str(out), **TINY})
    logs: list[str] = []
    status = run_pipeline(load_run_config(cfg), log=logs.append)
    return root, out, cfg, status, logs


def test_pipeline_runs_end_to_end(tiny_run):
    _root, out, _cfg, status, logs = tiny_run
    assert status == dict.fromkeys(STAGES, "ran")
    assert any("activations: done" in line for line in logs) and logs[-1].endswith("report.md")
    for name in STAGES:
        assert (out / name / "manifest.json").is_file()
    report = (out / "report.md").read_text()
    assert "## RSA" in report and "| V1 |" in report and "recovered" in report
    for png in ("best_layer.png", "max_r.png", "activation_image_0000.png", "activation_image_0003.png"):
        assert (out / "maps" / png).stat().st_size > 10_000
        assert f"(maps/{png})" in report
    numbers = json.loads((out / "analysis" / "numbers.json").read_text())
    assert numbers["layers"] == [0, 5, 11] and numbers["n_images"] == 40
    assert _finite(numbers["rsa"]) and _finite(numbers["hierarchy"])
    assert math.isfinite(numbers["encoding"]["median_r2"])
    assert math.isfinite(numbers["encoding"]["median_r2_over_ceiling"])
    assert 0 < numbers["rsa"]["sae_dictionary"]["p_value"] <= 1
    # the planted latents are recovered far above chance (1 in 3 x 96 latents); 40 images and four tokens
    # per image make SAE latents of neighbouring layers near-duplicates, so the threshold is modest
    syn = numbers["synthetic"]
    assert syn["recovered_fraction"] > 0.3, syn["recovered_fraction"]
    assert syn["chance_fraction"] == pytest.approx(1 / 288)
    assert syn["median_follows_planted_order"] is True
    # selectivity: each ROI's top latents in mean-r order, mostly from the ROI's planted layer
    sel = numbers["selectivity"]
    assert set(sel) == set(numbers["rois"]) and "ROI-consistent selectivity" in report
    for entries in sel.values():
        assert entries and [e["mean_r"] for e in entries] == sorted(
            (e["mean_r"] for e in entries), reverse=True
        )
        assert all(len(e["top_images"]) == 5 and 0 <= min(e["top_images"]) for e in entries)
    on_planted = [sel[r][0]["layer"] == syn["planted_layer"][r] for r in sel]
    assert sum(on_planted) >= 0.75 * len(on_planted), on_planted
    with np.load(out / "activations" / "sae_codes.npz") as f:
        assert sorted(f.files) == ["layer_00", "layer_05", "layer_11"] and f["layer_05"].shape == (40, 96)
    with np.load(out / "activations" / "residual_means.npz") as f:
        assert f["layer_11"].shape == (40, 768) and np.isfinite(f["layer_11"]).all()
    rows = (out / "dictionary" / "dictionary.csv").read_text().splitlines()
    assert rows[0].startswith("voxel,roi,layer,latent,r") and len(rows) == 1 + numbers["n_voxels"]
    assert (out / "analysis" / "roi_layer_counts_max.csv").is_file()


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as png:
        assert png.format == "PNG"
        return png.size


def test_selectivity_figures_draw_each_rois_top_latents_on_the_images_the_run_used(tiny_run):
    _root, out, _cfg, _status, _logs = tiny_run
    numbers = json.loads((out / "analysis" / "numbers.json").read_text())
    figures = json.loads((out / "maps" / "maps.json").read_text())["selectivity"]
    report = (out / "report.md").read_text()
    section = report.split("## ROI-consistent selectivity")[1].split("## Encoding")[0]
    with np.load(out / "activations" / "sae_codes.npz") as f:
        codes = {k: f[k] for k in f.files}
    with np.load(out / "maps" / "selectivity_maps.npz") as f:
        drawn = {k: f[k] for k in f.files}
    stored_total = 0.0
    for roi, entries in numbers["selectivity"].items():
        assert figures[roi] == f"selectivity_{roi}.png" and f"(maps/{figures[roi]})" in section
        assert min(_png_size(out / "maps" / figures[roi])) > 500
        patch_maps = drawn[f"maps_{roi}"]
        assert patch_maps.shape == (3, 5, 2, 2)  # 3 latents x 5 images x the 2 x 2 patch grid at 32 px
        np.testing.assert_array_equal(drawn[f"images_{roi}"], [e["top_images"] for e in entries])
        for latent_maps, e in zip(patch_maps, entries, strict=True):
            # recomputed for just these images, a map's mean is the per-image code the activations stage
            # stored for the whole dataset: same images, same backbone, same SAE
            stored = codes[f"layer_{e['layer']:02d}"][e["top_images"], e["latent"]]
            np.testing.assert_allclose(latent_maps.mean((1, 2)), stored, rtol=1e-4, atol=1e-6)
            stored_total += float(stored.sum())
    assert stored_total > 0


def test_rsa_heat_maps_are_drawn_for_the_rsa_voxels_and_embedded_in_the_rsa_section(tiny_run):
    _root, out, _cfg, _status, logs = tiny_run
    report = (out / "report.md").read_text()
    section = report.split("## RSA")[1].split("## Best layer")[0]
    assert "(analysis/rsa_heatmaps.png)" in section
    width, height = _png_size(out / "analysis" / "rsa_heatmaps.png")
    assert width > 2.5 * height  # brain, SAE dictionary and raw-neuron baseline side by side
    assert any("RSA heat maps rsa_heatmaps.png" in line for line in logs)
    assert any("map best_layer.png" in line for line in logs)


def test_rerun_skips_every_stage_and_changes_nothing(tiny_run):
    _root, out, cfg, _status, _logs = tiny_run
    before = _files(out)
    logs: list[str] = []
    status = run_pipeline(load_run_config(cfg), log=logs.append)
    assert status == dict.fromkeys(STAGES, "skipped")
    assert sum("skipped" in line for line in logs) == len(STAGES)
    assert _files(out) == before


def test_changing_a_middle_stage_reruns_it_and_later_ones(tiny_run, tmp_path):
    root, out, _cfg, _status, _logs = tiny_run
    cfg = _write(root / "changed.yaml", {"out": str(out), **TINY, "dictionary": {"centered": False}})
    status = run_pipeline(load_run_config(cfg), log=lambda _: None)
    assert status == {"activations": "skipped", "brain": "skipped", "dictionary": "ran", "analysis": "ran",
                      "maps": "ran", "report": "ran"}  # fmt: skip
    assert load_run_config(cfg).dictionary.centered is False
    # a lost output makes its stage run again; the later stages' inputs (hashes) are unchanged
    (out / "analysis" / "numbers.json").unlink()
    status = run_pipeline(load_run_config(cfg), log=lambda _: None)
    assert [s for s in STAGES if status[s] == "ran"] == ["analysis"]
    assert (out / "analysis" / "numbers.json").is_file()


def test_unknown_config_key_is_one_clear_error(tmp_path, capsys):
    bad = _write(tmp_path / "bad.yaml", {**TINY, "sae": {**TINY["sae"], "n_latent": 64}})
    msg = r"unknown key 'n_latent' in section 'sae'.*allowed: checkpoints"
    with pytest.raises(RunConfigError, match=msg):
        load_run_config(bad)
    with pytest.raises(SystemExit) as exc:
        main(["run", "--config", str(bad), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'n_latent'") and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    top = _write(tmp_path / "top.yaml", {"imagez": {"n_images": 4}})
    with pytest.raises(RunConfigError, match="unknown key 'imagez' in section '<top>'"):
        load_run_config(top)
    wrong = _write(tmp_path / "wrong.yaml", {"sae": {"steps": "many"}})
    with pytest.raises(RunConfigError, match=r"sae\.steps: Expected a <class 'int'>\. Got value: many"):
        load_run_config(wrong)


def test_shipped_configs_are_valid():
    demo = load_run_config(CONFIGS / "demo_run.yaml")
    assert demo.brain.kind == "synthetic" and demo.backbone.checkpoint is None
    nsd = load_run_config(CONFIGS / "nsd_subj01.yaml")
    assert nsd.brain.kind == "nsd" and nsd.images.source == "nsd" and nsd.brain.nsd.subject == 1
    assert nsd.sae.checkpoints is not None and nsd.maps.enabled is False


def test_selectivity_settings_redraw_the_figures_and_an_unchanged_rerun_skips_them(tiny_run):
    root, out, _cfg, _status, _logs = tiny_run
    before = _png_size(out / "maps" / "selectivity_V1.png")
    fewer = {**TINY, "analysis": {**TINY["analysis"], "selectivity_latents": 2, "selectivity_images": 3}}
    cfg = _write(root / "fewer.yaml", {"out": str(out), **fewer})
    status = run_pipeline(load_run_config(cfg), log=lambda _: None)
    assert [status[s] for s in ("activations", "brain", "analysis", "maps", "report")] == [
        "skipped", "skipped", "ran", "ran", "ran"
    ]  # fmt: skip
    with np.load(out / "maps" / "selectivity_maps.npz") as f:
        assert f["maps_V1"].shape == (2, 3, 2, 2) and f["images_FFA"].shape == (2, 3)
    after = _png_size(out / "maps" / "selectivity_V1.png")
    assert after[0] < before[0] and after[1] < before[1]  # 3 columns and 2 rows instead of 5 and 3
    mtime = (out / "maps" / "selectivity_V1.png").stat().st_mtime_ns
    status = run_pipeline(load_run_config(cfg), log=lambda _: None)
    assert status == dict.fromkeys(STAGES, "skipped")
    assert (out / "maps" / "selectivity_V1.png").stat().st_mtime_ns == mtime
