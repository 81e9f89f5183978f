"""The ``sae-brainmap`` command as users run it: every config, the demo path, checkpoints and resume."""

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from spikecore_testing import refuse_crafted_checkpoints

from sae_brainmap import BrainMapSAE, load_sae
from sae_brainmap.cli import run
from spikecore.train import last_checkpoint
from spikecore.train.checkpoint import CheckpointError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "img_size": 32}


def tiny_override(config: Path, tmp_path: Path, **trainer) -> Path:
    """A second config: a tiny random ViT, 8 embedded images, a CPU trainer writing into tmp_path."""
    cfg = yaml.safe_load(config.read_text())
    data = {"source": "embedded", "path": None, "n_images": 8, "batch_size": 4, "num_workers": 0}
    if cfg["data"]["class_path"].endswith("StoreDataModule"):
        data |= {"store": str(tmp_path / "store"), "images_per_shard": 4}
    override = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": str(tmp_path / "runs"),
            "enable_progress_bar": False,
            "logger": {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "t", "version": "v"},
            },
            **trainer,
        },
        "model": {"backbone_kwargs": TINY, "n_latents": 64, "k": 4 if cfg["model"].get("k") else None},
        "data": {"class_path": cfg["data"]["class_path"], "init_args": data},
    }
    path = tmp_path / f"tiny_{config.stem}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


@pytest.mark.parametrize("name", ["clip_vitb16_imagenet_relu_l1", "clip_vitb16_imagenet_topk", "demo"])
def test_fast_dev_run_of_every_config(name, tmp_path):
    config = CONFIGS / f"{name}.yaml"
    cfg = yaml.safe_load(config.read_text())
    cli = run(
        [
            "fit",
            "--config",
            str(config),
            "--config",
            str(tiny_override(config, tmp_path)),
            "--trainer.fast_dev_run",
            "1",
        ]
    )
    assert cli.trainer.state.finished
    model = cli.model
    assert model.hparams.kind == cfg["model"]["kind"] and model.hparams.lr == cfg["model"]["lr"]
    assert model.layers == [0, 1, 2] and set(model.saes) == {"layer_00", "layer_01", "layer_02"}
    for name_, sae in model.saes.items():
        for key in ("l0", "fve", "nmse", "dead_fraction", "loss"):
            assert torch.isfinite(cli.trainer.callback_metrics[f"train/{name_}/{key}"])
        assert sae.config.backbone == cfg["model"]["backbone"] and sae.config.tokens == "patch"


def test_the_papers_recipe_is_in_its_config():
    cfg = yaml.safe_load((CONFIGS / "clip_vitb16_imagenet_relu_l1.yaml").read_text())
    assert cfg["seed_everything"] == 42 and cfg["trainer"]["max_epochs"] == 5
    assert cfg["data"]["init_args"]["batch_size"] == 512 and cfg["model"]["lr"] == 5e-5
    assert cfg["model"]["n_latents"] == 12288 and cfg["model"]["sae_options"]["tied"] is True
    assert cfg["model"]["backbone"] == "vit_base_patch16_clip_quickgelu_224"


def test_store_fit_exports_sae_files_that_match_the_trained_module(tmp_path, capsys):
    config = CONFIGS / "demo.yaml"
    cli = run(
        [
            "fit",
            "--config",
            str(config),
            "--config",
            str(tiny_override(config, tmp_path)),
            "--trainer.max_epochs",
            "2",
        ]
    )
    assert (tmp_path / "store" / "manifest.json").is_file()  # extracted before training
    printed = capsys.readouterr().out
    assert "layer_02" in printed and "fve" in printed and "dead_fraction" in printed
    saes = sorted((tmp_path / "runs" / "t" / "v" / "saes").glob("*.safetensors"))
    assert [p.stem for p in saes] == ["layer_00", "layer_01", "layer_02"]
    sae = load_sae(saes[1])
    assert sae.config.layer == 1 and sae.config.kind == "topk" and sae.config.k == 4
    x = torch.randn(16, 32)
    trained = cli.model.saes["layer_01"].eval()
    torch.testing.assert_close(sae(x)[0], trained(x)[0])
    assert cli.model.epoch_metrics["layer_01"]["l0"] <= 4


def test_checkpoint_resume_continues_and_bad_checkpoints_fail_clearly(tmp_path):
    config = CONFIGS / "clip_vitb16_imagenet_relu_l1.yaml"
    over = tiny_override(config, tmp_path)
    cli = run(["fit", "--config", str(config), "--config", str(over), "--trainer.max_epochs", "1"])
    last = last_checkpoint(cli.trainer)
    assert cli.trainer.global_step == 2 and last.is_file()
    assert not any(k.startswith("backbone.") for k in torch.load(last, weights_only=True)["state_dict"])
    resumed = run(
        [
            "fit",
            "--config",
            str(config),
            "--config",
            str(over),
            "--trainer.max_epochs",
            "2",
            "--ckpt_path",
            str(last),
        ]
    )
    assert resumed.trainer.global_step == 4
    before = cli.model.saes["layer_00"].W_enc
    assert not torch.equal(resumed.model.saes["layer_00"].W_enc, before)

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        run(["fit", "--config", str(config), "--config", str(over), "--ckpt_path", str(bad)])
    # LightningCLI rebuilds the model from the checkpoint's own hyper-parameters, so a mismatch can only
    # come from a model built by hand: refused with the keys' and shapes' story, never half-loaded.
    other = BrainMapSAE(backbone_kwargs=TINY, expansion=4, print_metrics=False)
    loader = torch.utils.data.DataLoader(torch.randn(8, 3, 32, 32), batch_size=4)
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_progress_bar=False, default_root_dir=tmp_path / "o"
    )
    with pytest.raises(CheckpointError, match="does not fit these SAEs"):
        trainer.fit(other, loader, ckpt_path=str(last))


def test_a_checkpoint_named_in_a_config_file_runs_nothing(tmp_path):
    """`sae-brainmap fit` with a crafted checkpoint from disk or a loopback URL named in a config file
    (which LightningCLI would hand to the trainer): one line, exit 2, no request, no code run, no output."""
    config = CONFIGS / "clip_vitb16_imagenet_relu_l1.yaml"
    common = ["--config", str(config), "--config", str(tiny_override(config, tmp_path))]
    refuse_crafted_checkpoints(
        tmp_path, "sae_brainmap", lambda source, named: [["fit", *common, "--config", named]]
    )
    assert not (tmp_path / "store").exists()
