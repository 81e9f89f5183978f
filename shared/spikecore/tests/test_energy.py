"""spikecore.energy against closed forms computed here from the spikes that ran, spikingjelly's op counters
(an independent peer, where its convention is the papers') and torch's FlopCounterMode totals."""

import math

import pytest
import torch
from spikingjelly.activation_based.op_counter import DispatchCounterMode, MACCounter, SynOpCounter
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import spikecore
from spikecore.energy import EnergyCounter, estimate, estimate_batches
from spikecore.errors import ConfigError
from spikecore.models import create_model

BN = [nn.BatchNorm1d, nn.BatchNorm2d]


def _excite(model: nn.Module, seed: int = 0, shift: float = 0.8) -> nn.Module:
    """BN affine shifts so that the LIFs of a tiny random model fire (eval mode uses these)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = 1 + 0.3 * torch.randn(n, generator=g)
            m.bias.data = shift + 0.4 * torch.randn(n, generator=g)
    return model.eval()


def _capture(modules: dict[str, nn.Module], what: str = "input") -> tuple[dict, list]:
    """Forward hooks keeping each module's first input (or output) at its last call."""
    seen, handles = {}, []
    for name, m in modules.items():

        def hook(mod, args, out, name=name):
            seen[name] = (args[0] if what == "input" else out).detach().clone()

        handles.append(m.register_forward_hook(hook))
    return seen, handles


def _rows(report) -> dict[str, dict]:
    return {(r.layer, r.kind, r.input): r for r in report.layers}


def _round(x: float) -> int:
    return math.floor(x + 0.5)


def _mixed_spikes(s: torch.Tensor) -> float:
    """The rate of a binary tensor, checked to hold both zeros and ones (else the test proves little)."""
    assert bool(((s == 0) | (s == 1)).all())
    rate = float(s.mean())
    assert 0 < rate < 1
    return rate


# -- closed forms ---------------------------------------------------------------------------------------
def test_linear_lif_linear_matches_the_hand_count():
    torch.manual_seed(0)
    T, B, n_in, n_hid, n_out = 4, 3, 8, 16, 5
    net = nn.Sequential(nn.Linear(n_in, n_hid), spikecore.LIF(), nn.Linear(n_hid, n_out))
    x = 3 * torch.randn(T, B, n_in)
    seen, handles = _capture({"lif": net[1]}, what="output")
    report = estimate(net, x, samples=B)
    for h in handles:
        h.remove()
    spikes = seen["lif"]
    rate = _mixed_spikes(spikes)
    macs = T * B * n_in * n_hid  # the first layer, on real values
    dense2 = T * B * n_hid * n_out
    acs = _round(dense2 * rate)  # the second layer, on spikes: its MACs weighted by the rate
    assert acs == int(spikes.sum()) * n_out  # (the same thing: each spike adds one weight per output)
    assert (report.macs, report.acs, report.dense_macs) == (macs, acs, macs + dense2)
    assert report.flops == 2 * (macs + dense2)
    assert report.params == n_in * n_hid + n_hid + n_hid * n_out + n_out
    assert report.energy_mj == pytest.approx((4.6 * macs + 0.9 * acs) * 1e-9, rel=1e-12)
    rows = _rows(report)
    assert set(rows) == {("0", "linear", "real"), ("2", "linear", "spikes")}
    assert rows["0", "linear", "real"].input_rate is None and rows["0", "linear", "real"].macs == macs
    assert rows["2", "linear", "spikes"].input_rate == pytest.approx(rate, abs=1 / dense2)
    d = report.to_dict()
    assert d["per_sample"]["energy_mj"] == pytest.approx(report.energy_mj / B)
    # spikingjelly's counters agree where their convention is the papers' (linear layers, binary spikes).
    syn, mac = SynOpCounter(), MACCounter()
    with torch.no_grad(), DispatchCounterMode([syn, mac]):
        net(x)
    assert syn.get_total() == acs and mac.get_total() == macs


def test_conv_lif_conv_matches_the_hand_count():
    torch.manual_seed(1)
    N, C, H, W, C1, C2 = 3, 3, 9, 10, 6, 4
    net = nn.Sequential(
        nn.Conv2d(C, C1, 3, padding=1), spikecore.LIF(), nn.Conv2d(C1, C2, 3, stride=2, padding=1)
    )
    x = 2 * torch.randn(N, C, H, W)
    seen, handles = _capture({"conv2": net[2]})
    report = estimate(net, x)
    for h in handles:
        h.remove()
    rate = _mixed_spikes(seen["conv2"])
    ho, wo = (H + 2 - 3) // 2 + 1, (W + 2 - 3) // 2 + 1  # output size of the strided conv
    macs = N * C1 * H * W * C * 9
    dense2 = N * C2 * ho * wo * C1 * 9
    assert (report.macs, report.acs) == (macs, _round(dense2 * rate))
    assert report.dense_macs == macs + dense2
    assert {(r.layer, r.kind, r.input) for r in report.layers} == {
        ("0", "conv2d", "real"),
        ("2", "conv2d", "spikes"),
    }


def test_spike_or_real_is_decided_per_tensor_and_counts_are_an_option():
    torch.manual_seed(2)
    fc = nn.Linear(6, 3, bias=False)
    real = torch.randn(5, 6)
    binary = (torch.rand(5, 6) < 0.3).float()
    counts = torch.randint(0, 3, (5, 6)).float()  # e.g. a SEW residual sum of two spike maps
    assert estimate(fc, real).macs == 90 and estimate(fc, real).acs == 0
    assert estimate(fc, binary).acs == int(binary.sum()) * 3 and estimate(fc, binary).macs == 0
    assert estimate(fc, counts).acs == int(counts.sum()) * 3  # each count is that many events
    strict = estimate(fc, counts, integer_counts=False)
    assert strict.macs == 90 and strict.acs == 0
    assert estimate(fc, real.abs() + 0.5).macs == 90  # positive but not integer: real-valued


def test_spike_times_spike_matmul_takes_the_sparser_operand():
    class QK(nn.Module):
        def forward(self, q, k):
            return q @ k.transpose(-2, -1)

    g = torch.Generator().manual_seed(3)
    q = (torch.rand(2, 7, 5, generator=g) < 0.4).float()
    k = (torch.rand(2, 9, 5, generator=g) < 0.1).float()
    report = estimate(QK(), (q, k))
    dense = 2 * 7 * 9 * 5
    rate = min(_mixed_spikes(q), _mixed_spikes(k))
    assert report.acs == _round(dense * rate) and report.macs == 0
    (row,) = report.layers
    assert (row.layer, row.kind, row.input) == ("QK", "matmul", "spikes")


# -- a spikecore backbone ---------------------------------------------------------------------------------
def _tiny_spikformer(order: str) -> nn.Module:
    m = create_model("spikformer_4_384", img_size=16, embed_dim=64, depth=1, num_heads=4, T=2)
    m.blocks[0].attn.order = order
    return _excite(m)


@pytest.mark.parametrize("order", ["qk_first", "kv_first"])
def test_spikformer_against_spikingjelly_torch_and_closed_forms(order):
    torch.manual_seed(4)
    model = _tiny_spikformer(order)
    attn = model.blocks[0].attn
    assert attn.order == order
    x = torch.rand(2, 3, 16, 16)
    watched = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Conv1d)}
    inputs, h1 = _capture(watched)
    qkv, h2 = _capture({p: getattr(attn, f"{p}_lif") for p in "qkv"}, what="output")
    report = estimate(model, x, samples=2, integer_counts=False)
    for h in h1 + h2:
        h.remove()
    rows = _rows(report)

    # torch's own module-level counter: the same total FLOPs (2 per dense MAC).
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    assert report.flops == fc.get_total_flops()

    # spikingjelly on the same model and input, BatchNorm left out as the papers (and we) do.
    syn, mac = SynOpCounter(extra_ignore_modules=BN), MACCounter(extra_ignore_modules=BN)
    with torch.no_grad(), DispatchCounterMode([syn, mac]):
        model(x)
    assert report.macs == mac.get_total() > 0  # the stem on the image, and what is not binary
    binary_1x1 = ["blocks.0.attn.proj_conv", "blocks.0.mlp.fc2_conv"]  # inputs: a LIF's spikes
    for name in binary_1x1:
        _mixed_spikes(inputs[name])
        ours = rows[name, "conv1d", "spikes"].acs
        assert ours == sum(syn.records[f"Spikformer.{name}"].values()) > 0

    # Every conv on spikes: its dense MACs (from the geometry) x the rate of the input that ran.
    for name, conv in watched.items():
        inp = inputs[name]
        if not bool(((inp == 0) | (inp == 1)).all()):
            continue
        k = math.prod(conv.kernel_size)
        n_out = inp.shape[0] * conv.out_channels * math.prod(inp.shape[2:])  # stride 1, same padding
        dense = n_out * conv.in_channels * k
        row = rows[name, f"conv{len(conv.kernel_size)}d", "spikes"]
        assert (row.dense_macs, row.acs) == (dense, _round(dense * float(inp.mean())))

    # The attention products, from the Q, K, V spikes (heads of d channels, N tokens).
    T, B, C, N = qkv["q"].shape  # [T, B, C, N]
    d = C // attn.num_heads
    bh = T * B * attn.num_heads
    r = {p: _mixed_spikes(qkv[p]) for p in "qkv"}
    if order == "qk_first":  # (K^T Q): spikes x spikes, then V (.): spikes x counts (real here)
        expected = _round(bh * N * d * N * min(r["k"], r["q"])) + _round(bh * d * N * N * r["v"])
    else:  # (V K^T): spikes x spikes, then (.) Q: counts x spikes
        expected = _round(bh * d * N * d * min(r["v"], r["k"])) + _round(bh * d * d * N * r["q"])
    assert rows["blocks.0.attn", "matmul", "spikes"].acs == expected

    # With integer counts (the default) the residual sums x + attn(x) count as spikes: fewer MACs, the
    # same dense total.
    counted = estimate(model, x, samples=2)
    assert counted.dense_macs == report.dense_macs and counted.macs < report.macs
    assert counted.energy_mj < report.energy_mj


# -- constants, state and errors --------------------------------------------------------------------------
def test_energy_constants_can_be_changed():
    torch.manual_seed(5)
    model = _tiny_spikformer("kv_first")
    x = torch.rand(1, 3, 16, 16)
    base = estimate(model, x)
    assert base.macs > 0 and base.acs > 0
    only_mac = estimate(model, x, e_mac_pj=1.0, e_ac_pj=0.0)
    assert only_mac.energy_mj == pytest.approx(base.macs * 1e-9)
    other = estimate(model, x, e_mac_pj=3.7, e_ac_pj=0.1)
    assert other.energy_mj == pytest.approx((3.7 * base.macs + 0.1 * base.acs) * 1e-9)
    repriced = base.with_constants(e_mac_pj=3.7, e_ac_pj=0.1)
    assert repriced.energy_mj == pytest.approx(other.energy_mj)
    assert sum(r.energy_mj for r in repriced.layers) == pytest.approx(other.energy_mj)
    assert (repriced.macs, repriced.acs) == (base.macs, base.acs)
    assert repriced.with_constants(e_ac_pj=0.9).energy_mj == pytest.approx(
        (3.7 * base.macs + 0.9 * base.acs) * 1e-9
    )
    with pytest.raises(ConfigError, match="e_mac_pj must be a finite number"):
        base.with_constants(e_mac_pj=float("inf"))


def test_estimate_leaves_the_model_as_it_was_and_batches_add_up():
    torch.manual_seed(6)
    model = _tiny_spikformer("kv_first").train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x1, x2 = torch.rand(1, 3, 16, 16), torch.rand(2, 3, 16, 16)
    one, two = estimate(model, x1), estimate(model, x2)
    both = estimate_batches(model, [x1, x2], samples=3)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k  # BN running statistics untouched
    assert (both.macs, both.acs, both.dense_macs) == (
        one.macs + two.macs,
        one.acs + two.acs,
        one.dense_macs + two.dense_macs,
    )
    assert both.to_dict()["per_sample"]["dense_macs"] == pytest.approx(both.dense_macs / 3)


def test_counter_over_several_calls_as_the_analyses_use_it():
    torch.manual_seed(7)
    fc = nn.Linear(4, 2)
    with torch.no_grad(), EnergyCounter(fc) as counter:
        fc(torch.randn(3, 4))
        fc((torch.rand(3, 4) < 0.5).float())
    rows = _rows(counter.report())
    assert rows["Linear", "linear", "real"].calls == 1 and rows["Linear", "linear", "spikes"].calls == 1
    fc(torch.randn(3, 4))  # after the block nothing is counted any more
    assert counter.report().dense_macs == 2 * 3 * 4 * 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(e_mac_pj=-1.0), "e_mac_pj must be a finite number of picojoules >= 0"),
        (dict(e_ac_pj=float("nan")), "e_ac_pj must be a finite number"),
        (dict(e_ac_pj="cheap"), "e_ac_pj must be a number of picojoules"),
        (dict(samples=0), "samples must be a positive integer"),
    ],
)
def test_bad_options_are_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        estimate(nn.Linear(2, 2), torch.randn(1, 2), **kwargs)


def test_bad_model_or_inputs_are_one_clear_error():
    with pytest.raises(ConfigError, match=r"needs a torch\.nn\.Module, got function"):
        estimate(lambda x: x, torch.randn(1, 2))
    with pytest.raises(ConfigError, match="inputs must be a tensor, a tuple/list"):
        estimate(nn.Linear(2, 2), "an image")
    with pytest.raises(ConfigError, match="no inputs"):
        estimate_batches(nn.Linear(2, 2), [])


def test_command_line_counts_a_registered_backbone(capsys):
    from spikecore.energy import main

    assert main(["spikformer_4_384", "--T", "1", "--img_size", "16", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    model = create_model("spikformer_4_384", T=1, img_size=16)
    expected = estimate(model, torch.rand(1, 3, 16, 16))
    assert f"{expected.params:,} parameters, {expected.dense_macs / 1e9:.4f} G dense MACs" in out
    assert main(["spikformer_4_385"]) == 2
    assert "unknown model 'spikformer_4_385'" in capsys.readouterr().err
