"""`sae-brainmap run`: every user error is one line and exit status 2, found before any image goes through
the ViT; the output folder is checked first; ``--rebuild`` reruns stages whose manifests match."""

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from sae_brainmap import make_sae
from sae_brainmap import pipeline as pipeline_module
from sae_brainmap.backbone import ViTBackbone
from sae_brainmap.cli import main, run_command
from sae_brainmap.pipeline import STAGES, _stamp, check_run, run_pipeline
from sae_brainmap.run_config import RunConfigError, load_run_config, min_images

# vit_tiny (192 wide, 12 blocks) at 32 px: 4 patch tokens per image, quick to build and run
SMALL = {
    "images": {"source": "embedded", "n_images": 6, "batch_size": 3},
    "backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "layers": [0, 11]},
    "sae": {"kind": "topk", "n_latents": 16, "k": 2, "steps": 3, "batch_size": 8},
    "brain": {"kind": "synthetic", "synthetic": {"rois": ["V1", "FFA"]}},
    "analysis": {"rsa_permutations": 9, "rsa_max_voxels": 50},
    "maps": {"enabled": False, "selectivity_figures": False},
}


def _config(tmp_path: Path, name: str = "run.yaml", **sections) -> Path:
    data = {"out": str(tmp_path / "out"), **SMALL}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _one_line_exit_2(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # warnings may come before
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


@pytest.fixture
def vit_calls(monkeypatch):
    """Every forward of any ViTBackbone (images through the ViT) is recorded."""
    calls: list[int] = []
    forward = ViTBackbone.forward

    def counting(self, images, layers=None):
        calls.append(len(images))
        return forward(self, images, layers)

    monkeypatch.setattr(ViTBackbone, "forward", counting)
    return calls


BAD_VALUES = [
    ({"sae": {"kind": "gated"}}, r"sae\.kind must be one of relu_l1, topk, batchtopk, jumprelu, got 'gated'"),
    ({"sae": {"k": 17}}, r"sae\.k must be in 1\.\.sae\.n_latents \(16\) for sae\.kind topk, got 17"),
    ({"sae": {"n_latents": 0}}, r"sae\.n_latents must be at least 1, got 0"),
    ({"sae": {"batch_size": 0}}, r"sae\.batch_size must be at least 1, got 0"),
    ({"sae": {"steps": 0}}, r"sae\.steps must be at least 1"),
    ({"sae": {"lr": -1.0}}, r"sae\.lr must be a positive number"),
    ({"backbone": {"layers": [0, 12]}},
     r"backbone\.layers \[12\] out of range: vit_tiny_patch16_224 has 12 blocks, layers 0\.\.11"),
    ({"backbone": {"layers": [-1]}}, r"backbone\.layers \[-1\] out of range"),
    ({"backbone": {"layers": []}}, r"backbone\.layers is empty"),
    ({"backbone": {"name": "vit_nonexistent"}}, r"backbone\.name 'vit_nonexistent'.*timm cannot build it"),
    ({"backbone": {"img_size": 8}}, r"backbone\.img_size 8 is smaller than .* patch size"),
    ({"images": {"n_images": 0}}, r"images\.n_images must be at least 1, got 0"),
    ({"images": {"batch_size": 0}}, r"images\.batch_size must be at least 1, got 0"),
    ({"images": {"source": "folder"}}, r"images\.source folder needs images\.path"),
    ({"brain": {"kind": "synthetic", "synthetic": {"rois": ["V1", "FFA-1"]}}},
     r"brain\.synthetic\.rois: unknown ROI name\(s\) 'FFA-1'; the synthetic subject has V1, V2"),
    ({"images": {"n_images": 5}}, r"images\.n_images: 5 images are too few; the analyses need at least 6"),
    ({"images": {"n_images": 20}, "analysis": {"test_fraction": 0.9}},
     r"20 images are too few; the analyses need at least 25 .*holds out 18 at analysis\.test_fraction 0\.9"),
    ({"analysis": {"rsa_max_voxels": 2}}, r"analysis\.rsa_max_voxels must be at least 3"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), BAD_VALUES, ids=[m[:24] for _, m in BAD_VALUES])
def test_a_value_that_cannot_work_is_one_error_when_the_config_is_read(change, message, tmp_path, capsys):
    path = _config(tmp_path, **change)
    with pytest.raises(RunConfigError, match=message):
        load_run_config(path)
    line = _one_line_exit_2(capsys, ["run", "--config", str(path)])
    assert line.startswith("error: ") and len(line) < 600
    assert not (tmp_path / "out").exists()  # nothing made, nothing run


def test_a_config_built_in_python_is_checked_by_run_pipeline_before_anything_is_written(tmp_path, vit_calls):
    good = load_run_config(_config(tmp_path))
    bad = dataclasses.replace(good, sae=dataclasses.replace(good.sae, kind="topk", k=99))
    with pytest.raises(RunConfigError, match=r"sae\.k must be in 1\.\.sae\.n_latents \(16\)"):
        run_pipeline(bad, log=lambda _: None)
    assert not (tmp_path / "out").exists() and vit_calls == []


def test_the_minimum_number_of_images_follows_the_encoding_split():
    # max(3, round(f * n)) held out and at least 3 to fit on
    assert min_images(0.2) == 6 and min_images(0.5) == 6 and min_images(0.75) == 11 and min_images(0.9) == 25
    for f in (0.1, 0.2, 0.5, 0.75, 0.9):
        n = min_images(f)
        assert n - max(3, round(f * n)) >= 3 and (n - 1) - max(3, round(f * (n - 1))) < 3


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_too_few_images_in_a_folder_source_are_found_before_the_work(tmp_path, capsys, vit_calls):
    folder = tmp_path / "stimuli"
    for i in range(5):
        _png(folder / ("a" if i < 3 else "b") / f"{i}.png", i)
    path = _config(tmp_path, images={"source": "folder", "path": str(folder)})
    config = load_run_config(path)  # the count needs the folder: checked when the run starts
    with pytest.raises(
        RunConfigError, match=r"images\.path: 5 images are too few; the analyses need at least 6"
    ):
        check_run(config)
    line = _one_line_exit_2(capsys, ["run", "--config", str(path)])
    assert "5 images are too few" in line
    assert not (tmp_path / "out").exists() and vit_calls == []
    missing = _config(tmp_path, "missing.yaml", images={"source": "folder", "path": str(tmp_path / "nope")})
    assert "does not exist" in _one_line_exit_2(capsys, ["run", "--config", str(missing)])


def test_unknown_nsd_roi_names_are_found_before_the_work(tmp_path, capsys):
    nsd = {"betas": [str(tmp_path / "betas_session01.nii.gz")], "expdesign": str(tmp_path / "design.mat"),
           "roi_files": {"floc-faces": str(tmp_path / "floc-faces.nii.gz"),
                         "mine": str(tmp_path / "mine.nii.gz")},
           "label_tables": {"mine": str(tmp_path / "mine.ctab")},
           "rois": ["FFA-1", "FFA", "blob"]}  # fmt: skip
    (tmp_path / "mine.ctab").write_text("0 Unknown\n1 blob\n2 spot\n")
    path = _config(tmp_path, images={"source": "nsd", "path": str(tmp_path / "stimuli.hdf5")},
                   brain={"kind": "nsd", "nsd": nsd})  # fmt: skip
    config = load_run_config(path)
    with pytest.raises(
        RunConfigError, match=r"brain\.nsd\.rois: unknown ROI name\(s\) 'FFA'; available: .*FFA-1"
    ):
        check_run(config)  # before the betas (which do not exist here) are opened
    assert "unknown ROI name(s) 'FFA'" in _one_line_exit_2(capsys, ["run", "--config", str(path)])
    no_table = dict(nsd, roi_files={"custom": str(tmp_path / "c.nii.gz")}, label_tables=None, rois=["x"])
    path = _config(tmp_path, "no_table.yaml", images={"source": "nsd", "path": str(tmp_path / "s.hdf5")},
                   brain={"kind": "nsd", "nsd": no_table})  # fmt: skip
    assert "no label table for ROI class 'custom'" in _one_line_exit_2(capsys, ["run", "--config", str(path)])


def test_an_output_folder_that_is_a_file_or_cannot_be_written_is_refused_first(
    tmp_path, capsys, vit_calls, monkeypatch
):
    a_file = tmp_path / "results"
    a_file.write_text("my notes")
    path = _config(tmp_path)
    line = _one_line_exit_2(capsys, ["run", "--config", str(path), "--out", str(a_file)])
    assert f"output folder (out) {a_file} is a file, not a folder" in line
    assert a_file.read_text() == "my notes"
    under_file = a_file / "run"
    line = _one_line_exit_2(capsys, ["run", "--config", str(path), "--out", str(under_file)])
    assert f"output folder (out) {under_file} cannot be written" in line

    def read_only(*args, **kwargs):  # what a read-only folder (or a full disk) answers
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    line = _one_line_exit_2(capsys, ["run", "--config", str(path), "--out", str(tmp_path / "ro")])
    assert "cannot be written (Permission denied): choose a writable path" in line
    assert vit_calls == []


def _write_sae(path: Path, sae) -> Path:
    """An SAE file as save_sae writes it, whatever its weights (save_sae itself refuses NaN)."""
    state = {k: v.detach().clone().contiguous() for k, v in sae.state_dict().items()}
    save_file(
        state,
        str(path),
        metadata={"format": "sae_brainmap.sae/1", "config": json.dumps(sae.config.to_dict())},
    )
    return path


def test_sae_and_backbone_files_that_cannot_be_used_stop_the_run_before_any_image(
    tmp_path, capsys, vit_calls
):
    saes = tmp_path / "saes"
    saes.mkdir()
    for layer in (0, 11):  # SAEs of a 64-wide backbone
        _write_sae(saes / f"layer_{layer:02d}.safetensors", make_sae("topk", 64, 16, k=2, layer=layer))
    path = _config(tmp_path, sae={"checkpoints": str(saes)})
    line = _one_line_exit_2(capsys, ["run", "--config", str(path)])
    assert (
        "the SAE for layer 0" in line
        and "takes 64-dim input, but vit_tiny_patch16_224's residual stream" in line
    )

    nan = make_sae("topk", 192, 16, k=2, layer=0)
    with torch.no_grad():
        nan.b_lat[3] = float("nan")
    _write_sae(tmp_path / "nan.safetensors", nan)
    both = {0: str(tmp_path / "nan.safetensors"), 11: str(tmp_path / "nan.safetensors")}
    path = _config(tmp_path, "nan.yaml", sae={"checkpoints": both})
    assert "NaN or infinite values in 'b_lat'" in _one_line_exit_2(capsys, ["run", "--config", str(path)])
    path = _config(tmp_path, "gap.yaml", sae={"checkpoints": {0: str(tmp_path / "nan.safetensors")}})
    assert "sae.checkpoints has no SAE for layer(s) [11]" in _one_line_exit_2(
        capsys, ["run", "--config", str(path)]
    )

    weights = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32
    ).state_dict()
    weights["blocks.3.mlp.fc1.weight"][0, 0] = float("inf")
    torch.save(weights, tmp_path / "vit.pt")
    path = _config(tmp_path, "vit.yaml", backbone={"checkpoint": str(tmp_path / "vit.pt")})
    line = _one_line_exit_2(capsys, ["run", "--config", str(path)])
    assert "backbone weights" in line and "NaN or infinite values in 'blocks.3.mlp.fc1.weight'" in line
    assert vit_calls == []  # every one of these stopped before an image went through the ViT


def test_an_sae_training_that_diverges_in_the_run_is_one_line(tmp_path, capsys):
    path = _config(tmp_path, sae={"lr": 1e30, "kind": "relu_l1"})
    line = _one_line_exit_2(capsys, ["run", "--config", str(path)])
    assert "layer 0: the SAE diverged at step 1: its loss is nan" in line
    assert not (tmp_path / "out" / "activations" / "manifest.json").exists()  # the stage is not done
    assert not list((tmp_path / "out" / "activations").rglob("*.safetensors"))  # no NaN SAE written


def test_rebuild_reruns_stages_whose_outputs_match_their_inputs(tmp_path, monkeypatch):
    ran: list[str] = []

    def stub(name):
        def runner(c, root, out, log):
            ran.append(name)
            (out / "out.txt").write_text(name)
            return ["out.txt"]

        return runner

    for name in STAGES:
        monkeypatch.setitem(pipeline_module._RUNNERS, name, stub(name))
    path = _config(tmp_path)
    assert set(run_command(["--config", str(path)]).values()) == {"ran"} and ran == list(STAGES)
    assert set(run_command(["--config", str(path)]).values()) == {"skipped"} and len(ran) == len(STAGES)
    assert set(run_command(["--config", str(path), "--rebuild"]).values()) == {"ran"}
    assert ran == list(STAGES) * 2


def test_images_in_subfolders_are_part_of_a_folders_stamp(tmp_path):
    flat = tmp_path / "flat"
    _png(flat / "0.png", 0)
    stamp = _stamp(str(flat))
    st = (flat / "0.png").stat()
    assert stamp == [
        str(flat),
        [("0.png", st.st_size, st.st_mtime_ns)],
    ]  # as before: flat folders keep hashes
    nested = tmp_path / "nested"
    _png(nested / "cats" / "0.png", 0)
    before = _stamp(str(nested))
    _png(nested / "cats" / "0.png", 1)  # another image under the same name, in a subfolder
    assert _stamp(str(nested)) != before


def test_run_reads_its_config_with_jsonargparse_like_every_command(tmp_path, capsys):
    """Several --config (later wins), a shipped config by name, dotted overrides, --print_config; the
    checks jsonargparse cannot express (k <= n_latents) still hold for an override."""
    from sae_brainmap.run_config import parse_run_args

    more = tmp_path / "more.yaml"
    more.write_text(yaml.safe_dump({"sae": {"k": 8}, "analysis": {"rsa_permutations": 5}}))
    config, rebuild = parse_run_args(["--config", "demo_run", "--config", str(more), "--sae.k", "16"])
    assert config.sae.k == 16 and config.analysis.rsa_permutations == 5 and not rebuild
    assert config.sae.n_latents == 1536 and config.out == "runs/sae-brainmap-demo/run"  # from demo_run
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["run", "--config", "demo_run", "--sae.k", "16", "--print_config"])
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (
        printed["sae"]["k"] == 16
        and printed["sae"]["n_latents"] == 1536
        and printed["images"]["n_images"] == 96
    )
    line = _one_line_exit_2(capsys, ["run", "--config", "demo_run", "--sae.k", "5000"])
    assert "sae.k must be in 1..sae.n_latents (1536)" in line
    line = _one_line_exit_2(capsys, ["run", "--config", "demo_run", "--sae.n_latent", "3"])
    assert "--sae.n_latent" in line  # no prefix matching of option names
    assert "run config no_such_config does not exist" in _one_line_exit_2(
        capsys, ["run", "--config", "no_such_config"]
    )


def test_help_lists_run_and_only_commands_that_work(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "{fit,run}" in out
    for gone in ("test", "predict", "validate"):  # the data modules have no such split
        with pytest.raises(SystemExit) as exc:
            main([gone])
        assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_fit_with_a_missing_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    line = _one_line_exit_2(
        capsys, ["fit", "--config", "demo", "--ckpt_path", str(tmp_path / "missing.ckpt")]
    )
    assert "missing.ckpt does not exist" in line


def test_fit_and_run_name_the_sae_the_same_way():
    """One SAE vocabulary: the run config's sae section uses BrainMapSAE's (fit's) names for the SAE itself;
    the rest say how `run` trains it (fit takes those from the trainer and data module)."""
    import inspect

    from sae_brainmap import BrainMapSAE
    from sae_brainmap.run_config import SAESection

    fit_names = set(inspect.signature(BrainMapSAE).parameters)
    run_names = {f.name for f in dataclasses.fields(SAESection)}
    assert run_names - fit_names == {"checkpoints", "steps", "batch_size", "seed"}
    assert {"kind", "n_latents", "k", "lr"} <= run_names & fit_names
    for name in ("demo", "clip_vitb16_imagenet_relu_l1", "clip_vitb16_imagenet_topk"):
        cfg = yaml.safe_load((Path(__file__).parent.parent / "configs" / f"{name}.yaml").read_text())
        assert "n_latents" in cfg["model"] and "expansion" not in cfg["model"]


def test_a_stages_code_version_reruns_it_and_the_stages_after_it(tmp_path, monkeypatch):
    """Each manifest hashes its stage module's VERSION: after an upgrade that bumps one stage, that stage
    and those that read it rerun; the stages before it are kept."""
    ran: list[str] = []

    def stub(name):
        def runner(c, root, out, log):
            ran.append(name)
            (out / "out.txt").write_text(name)
            return ["out.txt"]

        return runner

    for name in STAGES:
        monkeypatch.setitem(pipeline_module._RUNNERS, name, stub(name))
    path = _config(tmp_path)
    assert set(run_command(["--config", str(path)]).values()) == {"ran"}
    manifest = json.loads((tmp_path / "out" / "dictionary" / "manifest.json").read_text())
    ran.clear()
    monkeypatch.setattr(pipeline_module.dictionary, "VERSION", pipeline_module.dictionary.VERSION + 1)
    status = run_command(["--config", str(path)])
    assert ran == ["dictionary", "analysis", "maps", "report"]
    assert status == {"activations": "skipped", "brain": "skipped", "dictionary": "ran", "analysis": "ran",
                      "maps": "ran", "report": "ran"}  # fmt: skip
    assert (
        json.loads((tmp_path / "out" / "dictionary" / "manifest.json").read_text())["hash"]
        != manifest["hash"]
    )
    ran.clear()
    monkeypatch.setattr(pipeline_module.report, "VERSION", pipeline_module.report.VERSION + 1)
    run_command(["--config", str(path)])
    assert ran == ["report"]
