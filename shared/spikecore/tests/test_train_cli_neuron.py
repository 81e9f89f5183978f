"""The network's neuron as a ``neuron:`` section of a YAML config, through the CLI: built by jsonargparse,
saved in checkpoints as plain values, rebuilt from them; and checkpoints of the older keyword spelling."""

import pytest
import torch
from spikecore_testing import TINY_SPIKFORMER, write_config

import spikecore
from spikecore.errors import ConfigError
from spikecore.train import SpikingClassifier, last_checkpoint, run_cli

NEURON = {"tau": 3.0, "detach_reset": True, "surrogate": "atan", "alpha": 2.0, "backend": "torch"}
ARCH_KWARGS = {k: v for k, v in TINY_SPIKFORMER.items() if k != "backend"}  # the backend is in NEURON


def _neurons(model: torch.nn.Module) -> set[spikecore.NeuronConfig]:
    return {m.neuron for m in model.modules() if isinstance(m, spikecore.LIF)}


def test_a_neuron_section_builds_through_the_cli_and_comes_back_from_the_checkpoint(tmp_path):
    cfg = write_config(tmp_path, logger=False, model={"arch_kwargs": ARCH_KWARGS, "neuron": NEURON})
    cli = run_cli(SpikingClassifier, ["fit", "--config", str(cfg)])
    expected = spikecore.NeuronConfig(**NEURON)
    assert _neurons(cli.model.net) == {expected, expected.replace(v_threshold=0.5)}  # 0.5: attention maps
    assert cli.model.hparams.neuron == expected.to_dict()  # plain values, as checkpoints keep them
    ckpt = last_checkpoint(cli.trainer)
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]  # no NeuronConfig object inside
    assert saved["neuron"] == expected.to_dict()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        want = cli.model.eval()(x)
    pred = run_cli(SpikingClassifier, ["predict", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    assert _neurons(pred.model.net) == _neurons(cli.model.net)
    with torch.no_grad():
        torch.testing.assert_close(pred.model.eval()(x), want, rtol=0, atol=0)


def test_a_typo_in_the_neuron_section_is_reported(tmp_path, capsys):
    cfg = write_config(tmp_path, logger=False, model={"arch_kwargs": ARCH_KWARGS, "neuron": NEURON})
    with pytest.raises(SystemExit):
        run_cli(SpikingClassifier, ["fit", "--config", str(cfg), "--model.neuron.tauu", "2.0"])
    assert "tauu" in capsys.readouterr().err


def test_the_neuron_given_twice_is_one_config_error(tmp_path):
    cfg = write_config(tmp_path, logger=False, model={"neuron": NEURON})  # arch_kwargs still has backend
    with pytest.raises(ConfigError, match=r"model.neuron and model.arch_kwargs.backend both set"):
        run_cli(SpikingClassifier, ["fit", "--config", str(cfg)])


def test_a_checkpoint_of_the_keyword_spelling_still_loads(tmp_path):
    """A checkpoint saved before ``neuron`` existed: no such hyper-parameter, the neuron as keywords in
    ``arch_kwargs`` (here ``backend``). It is rebuilt with the same neurons and gives the same outputs."""
    cfg = write_config(tmp_path, logger=False)
    cli = run_cli(SpikingClassifier, ["fit", "--config", str(cfg)])
    ckpt = torch.load(last_checkpoint(cli.trainer), weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert hparams.pop("neuron") is None and hparams["arch_kwargs"]["backend"] == "torch"
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        want = cli.model.eval()(x)
    pred = run_cli(SpikingClassifier, ["predict", "--config", str(cfg), "--ckpt_path", str(old)])
    assert _neurons(pred.model.net) == _neurons(cli.model.net)
    assert {n.backend for n in _neurons(pred.model.net)} == {"torch"}
    with torch.no_grad():
        torch.testing.assert_close(pred.model.eval()(x), want, rtol=0, atol=0)
    # A config of today with a neuron section: the checkpoint's own hyper-parameters still rebuild it.
    new_cfg = write_config(
        tmp_path, "new.yaml", logger=False, model={"arch_kwargs": ARCH_KWARGS, "neuron": NEURON}
    )
    again = run_cli(SpikingClassifier, ["predict", "--config", str(new_cfg), "--ckpt_path", str(old)])
    assert _neurons(again.model.net) == _neurons(cli.model.net)
    init_args = {k: v for k, v in hparams.items() if k != "_instantiator"}  # LightningCLI's own key
    direct = SpikingClassifier(**init_args)  # what load_from_checkpoint and sae-brainmap do
    assert _neurons(direct.net) == _neurons(cli.model.net)
