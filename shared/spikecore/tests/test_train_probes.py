"""The shared firing-rate probe against the spikes themselves."""

import torch
from torch import nn

import spikecore
from spikecore.train.probes import FiringRates, plot_firing_rates


def test_firing_rates_are_the_mean_spike_count_per_layer(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(
        spikecore.LIF(backend="torch"), nn.Identity(), spikecore.LIF(v_threshold=0.5, backend="torch")
    )
    probe = FiringRates(net)
    xs = [torch.randn(4, 3, 10) * 2 for _ in range(2)]
    outs0, outs2 = [], []
    for x in xs:
        s0 = net[0](x)
        outs0.append(s0)
        outs2.append(net[2](s0))
    probe.remove()
    net[0](xs[0])  # after remove(): not counted
    rates = probe.rates()
    assert set(rates) == {"0", "2"}
    assert rates["0"] == torch.cat(outs0).double().mean().item()
    assert rates["2"] == torch.cat(outs2).double().mean().item()
    assert 0 < rates["0"] < 1
    plot_firing_rates({"a": rates, "b": rates}, tmp_path / "rates.png")
    assert (tmp_path / "rates.png").stat().st_size > 5_000
