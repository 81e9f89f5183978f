"""Theorem 4.3's sensitivity and the PM's surrogate gradients (Fig. 3) against independent float64
computations: the theorem's closed form, hand-written forward-mode derivatives, and numpy's histogram."""

import math

import numpy as np
import pytest
import torch
from tdformer_testing import lively
from torch import nn

import spikecore
from tdformer import create_model
from tdformer.gradients import (
    NeuronRecorder,
    SensitivityStats,
    diagonal_sensitivity,
    pm_surrogate_gradients,
    sample_neurons,
)

TAU = 2.0


def rect(x: torch.Tensor, v_th: float) -> torch.Tensor:
    """The theorem's rectangular surrogate: 1 / V_th on |x| < V_th / 2, else 0."""
    return (x.abs() < v_th / 2).double() / v_th


def test_epsilon_of_a_plain_backbone_is_the_theorems_closed_form():
    """Without feedback, dH_j(t2)/dH_j(t1) = prod_t (1 - 1/tau)(1 - V_th sigma'(H_j(t) - V_th)): 0 in the
    window V_th/2 < H < 3 V_th/2 and 1 - 1/tau outside at each step (Theorem 4.3, Eq. 24). H comes from
    an independent float64 run of the same neurons (soft reset, stored V: H = V + V_th S)."""
    torch.manual_seed(0)
    T = 4
    net = create_model(
        "spikformer_4_384", T=T, backend="torch", img_size=16, embed_dim=16, depth=1, num_heads=2
    )
    net = net.double()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    lively(net, x, scale=1.5)
    lifs = {n: m for n, m in net.named_modules() if isinstance(m, spikecore.LIF)}

    # reference run: the LIF modules themselves switched to the theorem's neurons, V stored
    spikes = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: spikes.__setitem__(n, o)) for n, m in lifs.items()]
    saved = {n: (m.v_reset, m.detach_reset, m.surrogate, m.alpha) for n, m in lifs.items()}
    for m in lifs.values():
        m.v_reset, m.detach_reset, m.surrogate, m.alpha, m.store_v_seq = (
            None,
            False,
            "rect",
            m.v_threshold,
            True,
        )
    with torch.no_grad():
        net(x)
    H = {n: (m.v_seq + m.v_threshold * spikes[n]).flatten(2) for n, m in lifs.items()}  # [T, B, n]
    for h in hooks:
        h.remove()
    for n, m in lifs.items():
        m.v_reset, m.detach_reset, m.surrogate, m.alpha = saved[n]
        m.store_v_seq, m.v_seq = False, None

    with torch.enable_grad(), NeuronRecorder(net, "theorem", probe=True) as rec:
        net(x)
        got = {
            n: diagonal_sensitivity(rec.z[n], rec.probes[n], sample_neurons(H[n].shape[2], 12)) for n in lifs
        }
    checked = zeros = 0
    for n, m in lifs.items():
        idx = sample_neurons(H[n].shape[2], 12)
        h = H[n][:, :, idx]  # [T, B, k]
        own = (1 - 1 / TAU) * (1 - m.v_threshold * rect(h - m.v_threshold, m.v_threshold))
        for t1 in range(T):
            for t2 in range(t1 + 1, T):
                want = own[t1:t2].prod(0)
                torch.testing.assert_close(got[n][t1, t2], want, rtol=0, atol=1e-12)
                checked += want.numel()
                zeros += int((want == 0).sum())
        assert torch.isnan(got[n][1, 0]).all() and torch.isnan(got[n][2, 2]).all()
    assert 0 < zeros < checked  # neurons both inside and outside the window
    # the recorder left the neurons as they were
    assert all((m.v_reset, m.detach_reset, m.surrogate, m.alpha) == saved[n] for n, m in lifs.items())
    assert all("forward" not in vars(m) for m in lifs.values())


class TopDown(nn.Module):
    """Two LIF layers run one step at a time; layer 2's spikes feed back into layer 1's next input:
    X1(t) = W1 u(t) + F S2(t-1), X2(t) = W2 S1(t). Stateful neurons carry V across the calls, as TDFormer's
    segments (here of one step, the theorem's setting) do."""

    def __init__(self, n_in: int, n1: int, n2: int):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1 = torch.randn(n1, n_in, generator=g, dtype=torch.float64)
        self.w2 = torch.randn(n2, n1, generator=g, dtype=torch.float64) * 0.8
        self.fb = torch.randn(n1, n2, generator=g, dtype=torch.float64) * 0.8
        self.lif1 = spikecore.LIF(stateful=True, backend="torch")
        self.lif2 = spikecore.LIF(stateful=True, backend="torch")

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # u: [T, B, n_in]
        spikecore.reset(self)
        s2 = None
        for t in range(u.shape[0]):
            x1 = u[t] @ self.w1.T + (0 if s2 is None else s2 @ self.fb.T)
            s1 = self.lif1(x1[None])[0]
            s2 = self.lif2((s1 @ self.w2.T)[None])[0]
        return s2


def forward_mode_reference(net: TopDown, u: torch.Tensor, layer: int, t1: int, j: int) -> list[torch.Tensor]:
    """dH_j(t2)/dH_j(t1) of ``layer`` (1 or 2) for t2 > t1, per sample, by pushing the tangent of a
    perturbation of H_j(t1) through the theorem's equations step by step (soft reset, rect surrogate):
    dH = (1 - 1/tau) dV + dX / tau, dS = sigma'(H - V_th) dH, dV = dH - V_th dS."""
    T, B, _ = u.shape
    th, a = 1.0, 1 - 1 / TAU
    v1 = torch.zeros(B, net.w1.shape[0], dtype=torch.float64)
    v2 = torch.zeros(B, net.w2.shape[0], dtype=torch.float64)
    s2 = torch.zeros_like(v2)
    dv1, dv2, ds2 = torch.zeros_like(v1), torch.zeros_like(v2), torch.zeros_like(v2)
    out = []
    for t in range(T):
        h1 = a * v1 + (u[t] @ net.w1.T + s2 @ net.fb.T) / TAU
        dh1 = a * dv1 + (ds2 @ net.fb.T) / TAU
        if layer == 1 and t == t1:
            dh1 = torch.zeros_like(dh1)
            dh1[:, j] = 1.0
        s1 = (h1 >= th).double()
        ds1 = rect(h1 - th, th) * dh1
        v1, dv1 = h1 - th * s1, dh1 - th * ds1
        h2 = a * v2 + (s1 @ net.w2.T) / TAU
        dh2 = a * dv2 + (ds1 @ net.w2.T) / TAU
        if layer == 2 and t == t1:
            dh2 = torch.zeros_like(dh2)
            dh2[:, j] = 1.0
        s2 = (h2 >= th).double()
        ds2 = rect(h2 - th, th) * dh2
        v2, dv2 = h2 - th * s2, dh2 - th * ds2
        if t > t1:
            out.append((dh1 if layer == 1 else dh2)[:, j].clone())
    return out


def test_epsilon_with_top_down_feedback_matches_forward_mode_derivatives():
    """With feedback, dH_j(t+1)/dH_j(t) gains (1/tau) [dX(t+1)/dS(t)]_jj sigma'(H_j(t) - V_th) (Eq. 25/107)
    and stays non-zero for neurons in the window where the plain LIF's is exactly 0."""
    T, B, n_in, n1, n2 = 6, 5, 4, 7, 6
    net = TopDown(n_in, n1, n2)
    u = torch.rand(T, B, n_in, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.2
    with torch.enable_grad(), NeuronRecorder(net, "theorem", probe=True) as rec:
        net(u)
        got = {
            name: diagonal_sensitivity(rec.z[name], rec.probes[name], torch.arange(n))
            for name, n in (("lif1", n1), ("lif2", n2))
        }
    rescued = 0
    for layer, name, n in ((1, "lif1", n1), (2, "lif2", n2)):
        z = torch.stack(rec.z[name]).detach()  # H - V_th: [T, B, n]
        for t1 in range(T - 1):
            for j in range(n):
                want = forward_mode_reference(net, u, layer, t1, j)
                for t2, w in enumerate(want, start=t1 + 1):
                    torch.testing.assert_close(got[name][t1, t2, :, j], w, rtol=0, atol=1e-12)
                in_window = z[t1, :, j].abs() < 0.5
                rescued += int((in_window & (got[name][t1, t1 + 1, :, j].abs() > 1e-6)).sum())
    assert rescued > 0  # the feedback keeps eps(t) non-zero where the plain LIF's is 0


def test_sensitivity_summary_averages_layers_and_counts_vanished_entries():
    net = TopDown(4, 7, 6)
    u = torch.rand(5, 8, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.2
    stats = SensitivityStats(neurons_per_layer=50)  # more than there are: every neuron
    with torch.enable_grad(), NeuronRecorder(net, "theorem", probe=True) as rec:
        net(u)
        stats.add(rec, steps=5)
        ref = {
            n: diagonal_sensitivity(rec.z[n], rec.probes[n], torch.arange(k))
            for n, k in (("lif1", 7), ("lif2", 6))
        }
    s = stats.summary()
    assert s["samples"] == 8 and set(s["layers"]) == {"lif1", "lif2"}
    for t1 in range(5):
        for t2 in range(5):
            if t2 <= t1:
                assert s["matrix"]["mean_abs"][t1][t2] is None
                continue
            per = [float(ref[n][t1, t2].abs().mean()) for n in ref]
            assert s["matrix"]["mean_abs"][t1][t2] == pytest.approx(sum(per) / 2, abs=1e-12)
            vanished = [float((ref[n][t1, t2].abs() <= 1e-6).double().mean()) for n in ref]
            assert s["matrix"]["vanished_fraction"][t1][t2] == pytest.approx(sum(vanished) / 2, abs=1e-12)
    window = [float((torch.stack(rec.z[n])[0].abs() < 0.5).double().mean()) for n in ref]
    assert s["one_step"]["in_window_fraction"][0] == pytest.approx(sum(window) / 2, abs=1e-12)


def test_pm_surrogate_gradient_histogram_counts():
    """Fig. 3's counts against numpy's histogram of sigma'(H - V_th) from an independent float64 loop of
    the PM token neuron: I = X * clamp(sum_c W_c X_c, b, a), H = V + (I - V) / tau, hard reset to 0."""
    torch.manual_seed(4)
    T, segments, B = 4, 2, 3
    net = create_model(
        "tdformer_spikformer_4_384",
        T=T,
        segments=segments,
        backend="torch",
        img_size=16,
        embed_dim=16,
        depth=1,
        num_heads=2,
    ).double()
    x = torch.rand(B, 3, 16, 16, dtype=torch.float64)
    lively(net, x, scale=2.0)
    with torch.no_grad():
        net.pm.token_weight.copy_(torch.randn(16, dtype=torch.float64) * 0.6)  # M below 0 and above a
    pm_in = []
    hook = net.pm.register_forward_pre_hook(lambda m, a: pm_in.append(a[0].detach()))
    with torch.no_grad():
        net(x)
    hook.remove()
    (X,) = pm_in  # one PM call: segment 1's output, [T', B, D, N]
    b, a = net.pm.clamp_min, net.pm.clamp_max
    bins = 25
    res = pm_surrogate_gradients(net, [(x, torch.zeros(B, dtype=torch.long))], torch.device("cpu"), bins)
    alpha = 4.0  # sigmoid's default
    edges = np.linspace(0.0, alpha / 4, bins + 1)
    assert res["bin_edges"] == pytest.approx(edges.tolist()) and res["clamp"] == [b, a]
    for label, lo, hi in (("clamped", b, a), ("unclamped", -math.inf, math.inf)):
        m = torch.einsum("tbcn,c->tbn", X, net.pm.token_weight.detach()).clamp(lo, hi)
        current = X * m[:, :, None, :]
        v = torch.zeros_like(current[0])
        sg = []
        for t in range(current.shape[0]):
            h = v + (current[t] - v) / TAU
            z = h - 1.0
            sig = torch.sigmoid(alpha * z)
            sg.append(alpha * sig * (1 - sig))
            v = torch.where(h >= 1.0, torch.zeros_like(h), h)
        want, _ = np.histogram(torch.stack(sg).numpy().ravel(), bins=edges)
        assert res[label]["counts"] == want.tolist()
        assert res[label]["values"] == current.numel() == sum(want)
        assert res[label]["mean"] == pytest.approx(float(torch.stack(sg).mean()), abs=1e-12)
        assert res[label]["map_var"] == pytest.approx(float(m.var()), abs=1e-12)
        raw = torch.einsum("tbcn,c->tbn", X, net.pm.token_weight.detach())
        outside = float(((raw < b) | (raw > a)).double().mean())
        assert res[label]["map_outside_clamp"] == pytest.approx(outside, abs=1e-12) and 0 < outside < 1
    assert res["clamped"]["counts"] != res["unclamped"]["counts"]  # the clamp mattered here
    assert (net.pm.clamp_min, net.pm.clamp_max) == (b, a)  # restored
