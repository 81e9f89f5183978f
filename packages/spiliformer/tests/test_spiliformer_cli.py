"""The ``spiliformer`` command as users run it: every config family, checkpoints, resume, analyze, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from spikecore_testing import refuse_crafted_checkpoints
from spiliformer_testing import CONFIGS, tiny_override

from spikecore.train import last_checkpoint
from spiliformer import SpiLiFormer
from spiliformer.cli import run as main

CONFIG_FILES = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "demo.yaml")
# One config per family (CIFAR 4-384, DVS 2-256, ImageNet 10-768); the others differ only in numbers.
FAMILIES = [CONFIGS / f"{n}.yaml" for n in ("cifar10_4_384", "cifar10dvs_2_256", "imagenet_10_768_224")]
CIFAR = CONFIGS / "cifar10_4_384.yaml"


def test_a_config_per_paper_experiment_with_its_recipe():
    names = {p.stem for p in CONFIG_FILES}
    assert names == {
        "cifar10_4_384",
        "cifar100_4_384",
        "cifar10dvs_2_256",
        "ncaltech101_2_256",
        "imagenet_10_768_224",
        "imagenet_10_768_288",
        "imagenet_10_768_384",
    }
    cifar = yaml.safe_load(CIFAR.read_text())
    m = cifar["model"]
    # 410: 400 epochs of cosine + 10 at min_lr, as the authors' timm scheduler runs (cooldown_epochs)
    assert (cifar["trainer"]["max_epochs"], m["T"], m["lr"], m["weight_decay"], m["warmup_epochs"]) == (
        410,
        4,
        1e-3,
        0.06,
        20,
    )
    assert (m["mixup"], m["mixup_off_epoch"], m["label_smoothing"], m["beta"]) == (0.5, 200, 0.1, 0.8)
    # 0: the authors pass 0.2, but their blocks never apply drop_path
    assert m["arch_kwargs"]["drop_path_rate"] == 0.0 and cifar["data"]["init_args"]["batch_size"] == 64
    assert yaml.safe_load((CONFIGS / "cifar100_4_384.yaml").read_text())["model"]["aug"] == 2.0
    dvs = yaml.safe_load((CONFIGS / "cifar10dvs_2_256.yaml").read_text())
    assert (dvs["model"]["T"], dvs["model"]["lr"], dvs["data"]["init_args"]["batch_size"]) == (16, 5e-3, 16)
    sizes = [yaml.safe_load((CONFIGS / f"imagenet_10_768_{r}.yaml").read_text()) for r in (224, 288, 384)]
    assert [c["model"]["arch_kwargs"]["img_size"] for c in sizes] == [224, 288, 384]
    assert all(c["model"]["beta"] == 0.5 for c in sizes)


@pytest.mark.parametrize("config", FAMILIES, ids=lambda p: p.stem)
def test_fast_dev_run_of_every_config_family(config, tmp_path):
    cli = main(
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
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert "train/ce_pass2" in cli.trainer.callback_metrics  # the two-pass loss ran
    cfg = yaml.safe_load(config.read_text())
    assert cli.model.hparams.lr == cfg["model"]["lr"]  # the recipe came through
    assert isinstance(cli.model.net, SpiLiFormer)


def test_lateral_inhibition_false_trains_the_baseline(tmp_path):
    over = tiny_override(CIFAR, tmp_path)
    args = ["fit", "--config", str(CIFAR), "--config", str(over), "--trainer.fast_dev_run", "1"]
    cli = main([*args, "--model.lateral_inhibition", "false"])
    assert type(cli.model.net).__name__ == "QKFormer"
    assert "train/ce_pass2" not in cli.trainer.callback_metrics


def _fit(tmp_path: Path, *extra: str, **trainer):
    over = tiny_override(CIFAR, tmp_path, limit_train_batches=3, limit_val_batches=2, **trainer)
    return main(["fit", "--config", str(CIFAR), "--config", str(over), *extra]), over


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of a tiny SpiLiFormer, shared by the checkpoint, resume and analyze tests."""
    tmp_path = tmp_path_factory.mktemp("trained")
    cli, over = _fit(tmp_path, "--trainer.max_epochs", "1")
    return cli, over, tmp_path


def test_checkpoint_round_trip_gives_the_same_predictions(trained):
    cli, over, _ = trained
    ckpt = last_checkpoint(cli.trainer)
    assert ckpt.is_file()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expected = cli.model.eval()(x)
    pred = main(["predict", "--config", str(CIFAR), "--config", str(over), "--ckpt_path", str(ckpt)])
    with torch.no_grad():
        got = pred.model.eval()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert expected.abs().sum() > 0


def test_resume_after_interruption_continues_where_it_stopped(trained):
    cli, over, _ = trained
    last = last_checkpoint(cli.trainer)
    assert cli.trainer.global_step == 3
    args = ["fit", "--config", str(CIFAR), "--config", str(over), "--trainer.max_epochs", "2"]
    resumed = main([*args, "--ckpt_path", str(last)])
    assert resumed.trainer.current_epoch == 2
    assert resumed.trainer.global_step == 6  # not restarted from zero


def test_analyze_writes_the_measures(trained, tmp_path):
    cli, over, _ = trained
    ckpt = str(last_checkpoint(cli.trainer))
    out = tmp_path / "analysis"
    base = ["analyze", "--config", str(CIFAR), "--config", str(over), "--ckpt_path", ckpt]
    res = main([*base, "--out", str(out), "--max_batches", "2"])
    saved = json.loads((out / "analysis.json").read_text())
    assert set(saved["modes"]) == {"spiliformer", "lateral_inhibition_off"} and res["samples"] == 8
    for mode in saved["modes"].values():
        assert len(mode["layers"]) == 3 and 0 <= mode["accuracy"] <= 1
        for layer in mode["layers"]:
            assert 0 < layer["chance"] < 1
            assert np.isnan(layer["fg_share"]) or 0 <= layer["fg_share"] <= 1
            assert np.isnan(layer["entropy"]) or 0 <= layer["entropy"] <= 1
        assert mode["firing_rates"] and all(0 <= r <= 1 for r in mode["firing_rates"].values())
    kinds = [layer["attention"] for layer in saved["modes"]["lateral_inhibition_off"]["layers"]]
    assert kinds == ["TokenQKAttention", "TokenQKAttention", "SpikingSelfAttention"]
    for png in ("attention_allocation.png", "firing_rates.png", "attention_maps.png", "energy.png"):
        assert (out / png).stat().st_size > 0
    # Operations and energy (spikecore.energy) of the same weights with and without lateral inhibition.
    on, off = (saved["modes"][m]["energy"] for m in ("spiliformer", "lateral_inhibition_off"))
    assert on["params"] > off["params"] and on["samples"] == off["samples"] == 8  # + the feedback generator
    assert on["dense_macs"] > off["dense_macs"] and off["macs"] > 0  # pass 2 and feedback; the stem
    for e in (on, off):
        assert e["energy_mj"] == pytest.approx((4.6 * e["macs"] + 0.9 * e["acs"]) * 1e-9)
        assert e["flops"] == 2 * e["dense_macs"] and e["per_sample"]["energy_mj"] == e["energy_mj"] / 8
        rows = e["layers"]
        assert sum(r["macs"] for r in rows) == e["macs"] and sum(r["acs"] for r in rows) == e["acs"]
    assert "lateral_inhibition_off" in (out / "energy.md").read_text()
    # A user-supplied mask (the option spiliformer adds to the command): everything foreground.
    masks = tmp_path / "masks.npy"
    np.save(masks, np.ones((8, 16, 16), dtype=bool))
    res = main([*base, "--out", str(tmp_path / "a2"), "--max_batches", "2", "--foreground", str(masks)])
    for layer in res["modes"]["spiliformer"]["layers"]:
        assert layer["chance"] == 1 and (np.isnan(layer["fg_share"]) or layer["fg_share"] == pytest.approx(1))


def test_bad_checkpoint_and_typo_give_clear_errors(tmp_path, capsys):
    over = tiny_override(CIFAR, tmp_path)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        main(["validate", "--config", str(CIFAR), "--config", str(over), "--ckpt_path", str(bad)])
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CIFAR), "--config", str(over), "--model.betaa", "0.5"])
    assert "betaa" in capsys.readouterr().err


def test_ddp_two_processes_on_cpu(tmp_path):
    over = tiny_override(CIFAR, tmp_path, max_steps=2, limit_val_batches=1, devices=2, strategy="ddp")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "spiliformer", "fit", "--config", str(CIFAR), "--config", str(over)],
        capture_output=True,
        text=True,
        timeout=500,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in proc.stderr + proc.stdout or "GLOBAL_RANK: 1" in proc.stderr + proc.stdout
    assert list((tmp_path / "runs").rglob("last.ckpt"))


def test_a_checkpoint_named_in_a_config_file_runs_nothing(tmp_path):
    """A crafted checkpoint, from disk or a loopback URL, named in a config file (which LightningCLI would
    hand to the trainer) or given to analyze: refused with one line and exit 2, no request, no code run."""
    config = CIFAR
    common = ["--config", str(config), "--config", str(tiny_override(config, tmp_path))]
    refuse_crafted_checkpoints(
        tmp_path,
        "spiliformer",
        lambda source, named: [
            ["validate", *common, "--config", named],
            ["analyze", *common, "--ckpt_path", source],
        ],
    )
