"""The packages' CLI as LightningCLI users know it: ``--optimizer`` / ``--lr_scheduler`` replace the recipe,
the package's own commands are listed in ``--help`` and have ``--print_config``, and packaged configs are
found by name."""

from pathlib import Path

import pytest
import torch
import yaml
from spikecore_testing import write_config

from spikecore.train import SpikingClassifier, run_cli
from spikecore.train.cli import console_main, list_packaged_configs, packaged_config


def test_the_recipe_runs_without_optimizer_options(tmp_path):
    cli = run_cli(SpikingClassifier, ["fit", "--config", str(write_config(tmp_path, logger=False))])
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.AdamW
    assert len(optimizer.param_groups) == 2  # the recipe's groups: no weight decay on 1-D parameters


def test_optimizer_and_scheduler_options_replace_the_recipe(tmp_path):
    cfg = write_config(tmp_path, logger=False, trainer={"max_epochs": 2})
    args = ["fit", "--config", str(cfg), "--optimizer", "SGD", "--optimizer.lr", "0.05"]
    args += ["--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1", "--lr_scheduler.gamma", "0.5"]
    cli = run_cli(SpikingClassifier, args)
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer) is torch.optim.SGD
    (scheduler,) = cli.trainer.lr_scheduler_configs
    assert type(scheduler.scheduler) is torch.optim.lr_scheduler.StepLR
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)  # stepped after each epoch
    saved = yaml.safe_load(Path(cli.trainer.log_dir, "config.yaml").read_text())
    assert saved["optimizer"]["class_path"] == "torch.optim.SGD"  # the run's config says what ran


def _console(monkeypatch, capsys, module, commands, *args) -> str:
    monkeypatch.setattr("sys.argv", ["pkg", *args])
    with pytest.raises(SystemExit) as exit_info:
        console_main(module, commands)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _analyze(model, dm, opts) -> dict:
    raise AssertionError("print_config must exit before the command runs")


def _add(ap) -> None:
    ap.add_argument("--bins", type=int, default=7)


def test_help_lists_the_packages_commands(monkeypatch, capsys):
    out = _console(
        monkeypatch, capsys, SpikingClassifier, {"analyze": (_analyze, "Measure things.")}, "--help"
    )
    assert "{fit,validate,test,predict,analyze}" in out and "Measure things." in out


def test_a_commands_print_config_shows_its_options_and_the_config(tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path, logger=False)
    commands = {"analyze": (_analyze, "Measure things.", _add)}
    out = _console(
        monkeypatch,
        capsys,
        SpikingClassifier,
        commands,
        "analyze",
        "--config",
        str(cfg),
        "--bins",
        "3",
        "--print_config",
        "--model.T",
        "3",
    )
    printed = yaml.safe_load(out)
    assert printed["analyze"]["bins"] == 3 and printed["analyze"]["split"] == "val"
    assert printed["model"]["T"] == 3  # overrides reach the model config
    assert printed["data"]["class_path"] == "spikecore.data.DigitsDataModule"


def test_packaged_configs_by_name():
    demo = Path(packaged_config("tdformer", "demo"))
    assert demo.is_file() and demo.name == "demo.yaml" and demo.parent.name == "configs"
    assert packaged_config("tdformer", "demo.yaml") == str(demo)
    assert "demo" in list_packaged_configs("tdformer")
    assert packaged_config("tdformer", "no_such_config") == "no_such_config"  # jsonargparse reports it
    assert packaged_config("tdformer", str(demo)) == str(demo)
