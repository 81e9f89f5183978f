"""The feedback pieces against their formulas, computed independently in plain PyTorch."""

import pytest
import torch

import spikecore
from tdformer.feedback import ControlModule, ProcessingModule


def test_pm_token_mixer_matches_formula():
    torch.manual_seed(0)
    T, B, D, N = 3, 2, 8, 5
    x = (torch.rand(T, B, D, N) < 0.4).float()
    pm = ProcessingModule(D, 0.0, 1.5, channel_mixer="none", backend="torch")
    with torch.no_grad():
        pm.token_weight.copy_(torch.randn(D) * 0.5)
    out = pm(x)
    # M[t, b, n] = clamp(sum_c W_c X[t, b, c, n], 0, 1.5), then LIF(X * M) from v = 0
    m = torch.zeros(T, B, N)
    for c in range(D):
        m += pm.token_weight[c].detach() * x[:, :, c, :]
    m = m.clamp(0.0, 1.5)
    ref, _ = spikecore.lif_reference(x * m[:, :, None, :], tau=2.0, v_threshold=1.0, v_reset=0.0)
    assert torch.equal(out, ref)
    assert out.sum() > 0  # the check is not vacuous: some tokens fire


@pytest.mark.parametrize("mixer", ["depthwise", "dense"])
def test_pm_channel_mixer_parameters_and_shape(mixer):
    D = 16
    pm = ProcessingModule(D, channel_mixer=mixer, backend="torch")
    conv = D if mixer == "depthwise" else D * D
    assert sum(p.numel() for p in pm.parameters()) == D + conv + 2 * D  # W, conv, BN affine
    out = pm((torch.rand(2, 3, D, 7) < 0.5).float())
    assert out.shape == (2, 3, D, 7)
    assert set(out.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(("control", "key"), [("cm1", "k_extra"), ("cm2", "v_extra"), ("cm3", "x_extra")])
def test_control_module_is_a_linear_map_into_its_branch(control, key):
    torch.manual_seed(1)
    D = 6
    cm = ControlModule(D, control)
    s = (torch.rand(2, 3, D, 4) < 0.5).float()
    out = cm(s)
    assert list(out) == [key]
    ref = torch.einsum("oc,tbcn->tbon", cm.proj.weight[:, :, 0], s)
    torch.testing.assert_close(out[key], ref)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="control"):
        ControlModule(4, "cm4")
    with pytest.raises(ValueError, match="channel_mixer"):
        ProcessingModule(4, channel_mixer="full")
    with pytest.raises(ValueError, match="clamp"):
        ProcessingModule(4, 2.0, 1.0)


def test_pm_neurons_are_its_explicit_arguments():
    """Both PM neurons take the options given (not the backbone's): a soft-reset, V_th 0.7, tau 3 token
    neuron against the plain LIF loop with those options."""
    torch.manual_seed(2)
    T, B, D, N = 4, 2, 8, 5
    opts = dict(tau=3.0, v_threshold=0.7, v_reset=None, detach_reset=False, surrogate="atan", alpha=1.5)
    pm = ProcessingModule(D, 0.0, 2.0, channel_mixer="depthwise", backend="torch", stateful=True, **opts)
    for lif in (pm.token_lif, pm.channel_lif):
        assert {k: v for k, v in lif.options().items() if k != "backend"} == opts and lif.stateful
    x = (torch.rand(T, B, D, N) < 0.5).float()
    m = torch.einsum("tbcn,c->tbn", x, pm.token_weight.detach()).clamp(0.0, 2.0)
    current = x * m[:, :, None, :]
    v = torch.zeros_like(current[0])
    want = []
    for t in range(T):  # H = V + (I - V) / tau; S = H >= V_th; soft reset V = H - V_th S
        h = v + (current[t] - v) / 3.0
        s = (h >= 0.7).float()
        want.append(s)
        v = h - 0.7 * s
    pm.channel_mixer = "none"  # the token neuron's spikes
    assert torch.equal(pm(x), torch.stack(want))
    defaults = ProcessingModule(D, backend="torch").token_lif  # the paper's neuron
    assert (defaults.tau, defaults.v_threshold, defaults.v_reset, defaults.detach_reset) == (
        2.0,
        1.0,
        0.0,
        True,
    )
    assert (defaults.surrogate, defaults.alpha) == ("sigmoid", None)


def test_pm_reads_a_neuron_config_like_every_spikecore_layer():
    """``neuron=NeuronConfig(...)`` is both PM neurons, the same as the keyword spelling; both at once is
    an error; the default is spikecore's BACKBONE_NEURON."""
    cfg = spikecore.NeuronConfig(
        tau=3.0,
        v_threshold=0.7,
        v_reset=None,
        decay_input=False,
        surrogate="atan",
        alpha=1.5,
        backend="torch",
    )
    pm = ProcessingModule(8, neuron=cfg, stateful=True)
    keywords = ProcessingModule(  # the keyword spelling has no decay_input (the PM's default: on)
        8,
        tau=3.0,
        v_threshold=0.7,
        v_reset=None,
        detach_reset=False,
        surrogate="atan",
        alpha=1.5,
        backend="torch",
    )
    for lif in (pm.token_lif, pm.channel_lif):
        assert lif.neuron == cfg and lif.stateful
    assert keywords.neuron == cfg.replace(decay_input=True)
    assert ProcessingModule(8).neuron == spikecore.BACKBONE_NEURON
    with pytest.raises(TypeError, match=r"ProcessingModule\(\) got neuron= and .*tau="):
        ProcessingModule(8, neuron=cfg, tau=2.0)
