"""The ``tdformer`` command as users run it: every config family, checkpoints, resume, analyze, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from spikecore_testing import refuse_crafted_checkpoints
from tdformer_testing import CONFIGS, tiny_override

import spikecore
from spikecore.train import last_checkpoint
from tdformer.cli import run as main

CONFIG_FILES = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "demo.yaml")


def test_a_config_per_paper_experiment():
    names = {p.stem for p in CONFIG_FILES}
    for needed in (
        "cifar10_spikformer_4_384",
        "cifar100_spikformer_4_384",
        "cifar10_sdt_2_512",
        "cifar10_qkformer_hst_4_384",
        "cifar10dvs_spikformer_2_256",
        "dvsgesture_sdt_2_256",
        "cifar10dvs_qkformer_hst_2_256",
        "imagenet_qkformer_hst_10_768",
    ):
        assert needed in names


@pytest.mark.parametrize("config", CONFIG_FILES, ids=lambda p: p.stem)
def test_fast_dev_run_of_every_config(config, tmp_path):
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
    loss = cli.trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss)
    cfg = yaml.safe_load(config.read_text())
    assert cli.model.hparams.lr == cfg["model"]["lr"]  # the recipe came through
    assert hasattr(cli.model.net, "forward_segments")  # and the feedback model was built


def _fit(tmp_path: Path, *extra: str, **trainer):
    config = CONFIGS / "cifar10_spikformer_4_384.yaml"
    over = tiny_override(config, tmp_path, limit_train_batches=3, limit_val_batches=2, **trainer)
    return main(["fit", "--config", str(config), "--config", str(over), *extra]), config, over


def test_checkpoint_round_trip_gives_the_same_predictions(tmp_path):
    cli, config, over = _fit(tmp_path, "--trainer.max_epochs", "1")
    ckpt = last_checkpoint(cli.trainer)
    assert ckpt.is_file()
    x = torch.rand(3, 3, 16, 16)
    trained = cli.model.eval()
    with torch.no_grad():
        expected = trained(x)
    pred = main(["predict", "--config", str(config), "--config", str(over), "--ckpt_path", str(ckpt)])
    restored = pred.model.eval()
    with torch.no_grad():
        got = restored(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, torch.zeros_like(got)) or expected.abs().sum() == 0


def test_a_checkpoint_of_the_older_meanings_still_loads(tmp_path, capsys):
    """A checkpoint saved when ``arch`` named the backbone and neurons were keywords (no ``neuron`` /
    ``pm_neuron``; ``backend`` in ``arch_kwargs``, the PM's ``pm_*``) is read in today's meaning, with a
    note, and gives the trained model's outputs."""
    from tdformer import TDFormerClassifier

    cli, config, over = _fit(tmp_path, "--trainer.max_epochs", "1", "--trainer.logger", "false")
    ckpt = torch.load(last_checkpoint(cli.trainer), weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["arch"] == "tdformer_spikformer_4_384" and hp["neuron"] is None and hp["pm_neuron"] is None
    hp["arch"] = "spikformer_4_384"
    del hp["neuron"], hp["pm_neuron"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        want = cli.model.eval()(x)
    capsys.readouterr()
    pred = main(["predict", "--config", str(config), "--config", str(over), "--ckpt_path", str(old)])
    err = capsys.readouterr().err
    assert 'saved by an older version; its hyper-parameters read as model.arch="spikformer_4_384" -> ' in err
    assert pred.model.hparams.arch == "tdformer_spikformer_4_384"
    with torch.no_grad():
        torch.testing.assert_close(pred.model.eval()(x), want, rtol=0, atol=0)
    with pytest.warns(FutureWarning, match="names a backbone"):  # load_from_checkpoint's way: cls(**hparams)
        direct = TDFormerClassifier(**{k: v for k, v in hp.items() if k != "_instantiator"})
    direct.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(direct.eval()(x), want, rtol=0, atol=0)


def test_neuron_sections_in_yaml(tmp_path):
    """``neuron:`` (the backbone's) and ``pm_neuron:`` (the processing module's) nest in the config."""
    config = CONFIGS / "cifar10_spikformer_4_384.yaml"
    over = tiny_override(config, tmp_path)
    arch_kwargs = {k: v for k, v in yaml.safe_load(over.read_text())["model"]["arch_kwargs"].items()}
    arch_kwargs.pop("backend")
    sections = tmp_path / "neurons.yaml"
    neuron = {"tau": 3.0, "detach_reset": True, "surrogate": "atan", "backend": "torch"}
    pm = {"tau": 1.5, "v_reset": None, "detach_reset": True}
    sections.write_text(
        yaml.safe_dump({"model": {"arch_kwargs": arch_kwargs, "neuron": neuron, "pm_neuron": pm}})
    )
    args = ["fit", "--config", str(config), "--config", str(over), "--config", str(sections)]
    cli = main([*args, "--trainer.fast_dev_run", "1"])
    net = cli.model.net
    backbone = {m.neuron for m in net.backbone.modules() if isinstance(m, spikecore.LIF)}
    cfg = spikecore.NeuronConfig(**neuron)
    assert backbone == {cfg, cfg.replace(v_threshold=0.5)}
    assert net.pm.neuron == spikecore.NeuronConfig(**pm, backend="torch")  # "auto": the backbone's backend
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_resume_after_interruption_continues_where_it_stopped(tmp_path):
    cli, config, over = _fit(tmp_path, "--trainer.max_epochs", "1", "--trainer.logger", "false")
    last = last_checkpoint(cli.trainer)
    steps_one_epoch = cli.trainer.global_step
    assert steps_one_epoch == 3
    resumed = main(
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
    assert resumed.trainer.current_epoch == 2
    assert resumed.trainer.global_step == 2 * steps_one_epoch  # not restarted from zero


def test_corrupted_or_malicious_checkpoint_gives_one_clear_error(tmp_path):
    config = CONFIGS / "cifar10_spikformer_4_384.yaml"
    over = tiny_override(config, tmp_path)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        main(["validate", "--config", str(config), "--config", str(over), "--ckpt_path", str(bad)])

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Evil()}, evil)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        main(["validate", "--config", str(config), "--config", str(over), "--ckpt_path", str(evil)])
    assert not marker.exists()  # nothing ran
    with pytest.raises(ValueError, match="does not exist"):
        main(
            [
                "validate",
                "--config",
                str(config),
                "--config",
                str(over),
                "--ckpt_path",
                str(tmp_path / "no.ckpt"),
            ]
        )


def test_config_typo_is_reported(tmp_path, capsys):
    config = CONFIGS / "cifar10_spikformer_4_384.yaml"
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(config),
                "--config",
                str(tiny_override(config, tmp_path)),
                "--model.lrr",
                "1e-3",
            ]
        )
    assert "lrr" in capsys.readouterr().err


def test_analyze_writes_the_measures(tmp_path):
    cli, config, over = _fit(tmp_path, "--trainer.max_epochs", "1")
    ckpt = str(last_checkpoint(cli.trainer))
    out = tmp_path / "analysis"
    res = main(
        [
            "analyze",
            "--config",
            str(config),
            "--config",
            str(over),
            "--ckpt_path",
            ckpt,
            "--out",
            str(out),
            "--max_batches",
            "2",
            "--grad_loss",
            "segments",
            "--epsilon_neurons",
            "4",
        ]
    )
    saved = json.loads((out / "analysis.json").read_text())
    assert set(saved["modes"]) == {"feedback", "no_feedback"}
    for mode in saved["modes"].values():
        assert len(mode["grad_norm_per_step"]) == 4 and len(mode["mi_steps_bits"]) == 3
        assert len(mode["mi_segments_bits"]) == 1
        assert all(v >= 0 for v in mode["mi_steps_bits"])
        assert mode["firing_rates"] and all(0 <= r <= 1 for r in mode["firing_rates"].values())
    assert (out / "mechanisms.png").stat().st_size > 0 and (out / "firing_rates.png").stat().st_size > 0
    # The paper's figures: the T x T MI matrix, gradients along time (Thm 4.3), the PM histogram (Fig. 3).
    assert saved["gradient_loss"]["name"] == "segments" and saved["gradient_loss"]["segment_weights"] == [
        pytest.approx(1 / 3),
        pytest.approx(2 / 3),
    ]
    for mode in saved["modes"].values():
        mi = mode["mi_matrix_bits"]
        assert [mi[t][t + 1] for t in range(3)] == mode["mi_steps_bits"]
        assert all(mi[i][j] == mi[j][i] for i in range(4) for j in range(4))
        eps = mode["epsilon"]
        assert eps["neurons"] == "theorem" and eps["neurons_per_layer"] == 4 and eps["samples"] == 4
        assert len(eps["grad_norm_per_step"]) == 4 and len(eps["one_step"]["mean_abs"]) == 3
        assert eps["layers"] and all(0 <= f <= 1 for f in eps["one_step"]["vanished_fraction"])
    hist = saved["pm_surrogate_gradients"]
    for label in ("clamped", "unclamped"):
        assert len(hist[label]["counts"]) == len(hist["bin_edges"]) - 1 == 40
        assert sum(hist[label]["counts"]) == hist[label]["values"] > 0
    for png in ("mi_matrix.png", "gradients.png", "pm_surrogate_gradients.png"):
        assert (out / png).stat().st_size > 0
    assert res["samples"] == 8
    # Operations and energy (spikecore.energy) of the same weights with and without feedback.
    on, off = (saved["modes"][m]["energy"] for m in ("feedback", "no_feedback"))
    assert on["params"] == off["params"] and on["samples"] == off["samples"] == 8
    assert on["dense_macs"] > off["dense_macs"] and off["macs"] > 0  # feedback's ops; the stem on images
    for e in (on, off):
        assert e["energy_mj"] == pytest.approx((4.6 * e["macs"] + 0.9 * e["acs"]) * 1e-9)
        assert e["flops"] == 2 * e["dense_macs"] and e["per_sample"]["energy_mj"] == e["energy_mj"] / 8
        rows = e["layers"]
        assert sum(r["macs"] for r in rows) == e["macs"] and sum(r["acs"] for r in rows) == e["acs"]
    assert "no_feedback" in (out / "energy.md").read_text() and (out / "energy.png").stat().st_size > 0


def test_ddp_two_processes_on_cpu(tmp_path):
    config = CONFIGS / "cifar10_spikformer_4_384.yaml"
    over = tiny_override(config, tmp_path, max_steps=2, limit_val_batches=1, devices=2, strategy="ddp")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "tdformer", "fit", "--config", str(config), "--config", str(over)],
        capture_output=True,
        text=True,
        timeout=500,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in proc.stderr + proc.stdout or "GLOBAL_RANK: 1" in proc.stderr + proc.stdout
    assert list((tmp_path / "runs").rglob("last.ckpt"))


def test_missing_dataset_is_one_message_not_a_traceback(tmp_path):
    config = CONFIGS / "cifar10_spikformer_4_384.yaml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tdformer",
            "fit",
            "--config",
            str(config),
            "--data.root",
            str(tmp_path / "none"),
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            "32-true",
            "--trainer.logger",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Expected layout" in proc.stderr and "cifar-10-batches-py" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_checkpoint_named_in_a_config_file_runs_nothing(tmp_path):
    """A crafted checkpoint, from disk or a loopback URL, named in a config file (which LightningCLI would
    hand to the trainer) or given to analyze: refused with one line and exit 2, no request, no code run."""
    config = CONFIGS / "cifar10_spikformer_4_384.yaml"
    common = ["--config", str(config), "--config", str(tiny_override(config, tmp_path))]
    refuse_crafted_checkpoints(
        tmp_path,
        "tdformer",
        lambda source, named: [
            ["validate", *common, "--config", named],
            ["analyze", *common, "--ckpt_path", source],
        ],
    )


def test_recipes_use_the_papers_learning_rates():
    """App. A.1: Spike-driven Transformer v1 at 3e-4; Spikformer at 5e-4 on static data, 1e-3 on DVS."""
    for path in CONFIG_FILES:
        cfg = yaml.safe_load(path.read_text())
        arch, lr = cfg["model"]["arch"], cfg["model"]["lr"]
        assert arch.startswith("tdformer_"), path.name  # arch names the registered model
        arch = arch.removeprefix("tdformer_")
        if arch.startswith("sdt"):
            assert lr == 3e-4, path.name
        elif arch.startswith("spikformer"):
            assert lr == (1e-3 if "dvs" in path.stem else 5e-4), path.name
