"""The reference loop and its backward recurrence, checked in float64.

1. The reverse-time recurrence of docs/spikecore-equations.md (what the fused kernels implement), as the
   backward of a smooth LIF (spike = g(H - V_th), g' = the surrogate), passes ``gradcheck`` against finite
   differences.
2. Autograd through the reference loop (Heaviside spike, surrogate derivative) equals that recurrence.
"""

import itertools

import pytest
import torch

import spikecore
from spikecore.neuron import surrogate as sg

TAU, VTH, VRESET = 2.0, 1.0, 0.0


def smooth_forward(x, v0, tau, soft, decay_input, spike):
    vr = 0.0 if soft else VRESET
    v, hs, ss, vps = v0, [], [], []
    for t in range(x.shape[0]):
        vps.append(v)
        h = v + (x[t] - (v - vr)) / tau if decay_input else v - (v - vr) / tau + x[t]
        s = spike(h - VTH)
        v = h - s * VTH if soft else s * VRESET + (1 - s) * h
        hs.append(h)
        ss.append(s)
    return torch.stack(ss), v, hs, vps


def spec_backward(x, hs, ss, vps, gs, gv, tau, soft, detach, decay_input, dsig):
    """The reverse-time recurrence exactly as written in docs/spikecore-equations.md."""
    vr = 0.0 if soft else VRESET
    carry, gx, gtau = gv, torch.empty_like(x), torch.zeros_like(gv)
    for t in reversed(range(x.shape[0])):
        h, s, d = hs[t], ss[t], dsig(hs[t] - VTH)
        if soft and detach:
            gh = gs[t] * d + carry
        elif soft:
            gh = (gs[t] - VTH * carry) * d + carry
        elif detach:
            gh = gs[t] * d + carry * (1 - s)
        else:
            gh = (gs[t] + carry * (VRESET - h)) * d + carry * (1 - s)
        gx[t] = gh / tau if decay_input else gh
        dh_dtau = -(x[t] - (vps[t] - vr)) / tau**2 if decay_input else (vps[t] - vr) / tau**2
        gtau = gtau + gh * dh_dtau
        carry = gh * (1 - 1 / tau)
    return gx, carry, gtau


class SmoothLIF(torch.autograd.Function):
    """Forward: LIF with a smooth spike g. Backward: that recurrence with S = g(H - V_th).

    A detached reset is a chosen approximation, not the derivative of any forward, so finite
    differences can only check the non-detached recurrence; the detached one is checked against
    autograd through the reference below.
    """

    @staticmethod
    def forward(ctx, x, v0, tau, soft, decay_input, name, alpha):
        s, v, hs, vps = smooth_forward(x, v0, tau, soft, decay_input, lambda z: sg.primitive(name, z, alpha))
        ctx.save_for_backward(x, tau)
        ctx.cfg = (soft, decay_input, name, alpha)
        ctx.state = (hs, list(s), vps)
        return s, v

    @staticmethod
    def backward(ctx, gs, gv):
        x, tau = ctx.saved_tensors
        soft, decay_input, name, alpha = ctx.cfg
        hs, ss, vps = ctx.state
        gx, gv0, gtau = spec_backward(
            x, hs, ss, vps, gs, gv, tau, soft, False, decay_input, lambda z: sg.derivative(name, z, alpha)
        )
        return gx, gv0, gtau.sum().reshape(tau.shape), None, None, None, None


SMOOTH = ["sigmoid", "atan", "piecewise_exp", "soft_sign", "super_spike", "erf"]


@pytest.mark.parametrize(("soft", "decay_input"), list(itertools.product([False, True], [True, False])))
@pytest.mark.parametrize("name", SMOOTH)
def test_spec_recurrence_matches_finite_differences(name, soft, decay_input):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 5, generator=g, dtype=torch.float64) + 0.8).requires_grad_()
    v0 = (torch.rand(5, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    tau = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    alpha = sg.SURROGATES[name].default_alpha

    def f(x, v0, tau):
        return SmoothLIF.apply(x, v0, tau, soft, decay_input, name, alpha)

    assert torch.autograd.gradcheck(f, (x, v0, tau), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("soft", "detach", "decay_input"), list(itertools.product([False, True], [False, True], [True, False]))
)
@pytest.mark.parametrize("name", sorted(sg.SURROGATES))
def test_reference_autograd_equals_spec_recurrence(name, soft, detach, decay_input):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 7, generator=g, dtype=torch.float64) * 1.5 + 0.6).requires_grad_()
    v0 = (torch.rand(7, generator=g, dtype=torch.float64)).requires_grad_()
    tau = torch.full((7,), 2.0, dtype=torch.float64, requires_grad=True)
    gs, gv = (
        torch.randn(6, 7, generator=g, dtype=torch.float64),
        torch.randn(7, generator=g, dtype=torch.float64),
    )
    alpha = sg.SURROGATES[name].default_alpha
    s, v = spikecore.lif_reference(
        x,
        v0,
        tau=tau,
        v_reset=None if soft else VRESET,
        decay_input=decay_input,
        detach_reset=detach,
        surrogate=name,
    )
    torch.autograd.backward([s, v], [gs, gv])

    with torch.no_grad():
        s2, v2, hs, vps = smooth_forward(x, v0, tau, soft, decay_input, lambda z: (z >= 0).double())
        gx, gv0, gtau = spec_backward(
            x,
            hs,
            list(s2),
            vps,
            gs,
            gv,
            tau,
            soft,
            detach,
            decay_input,
            lambda z: sg.derivative(name, z, alpha),
        )
    torch.testing.assert_close(s, s2)
    torch.testing.assert_close(v, v2)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(v0.grad, gv0)
    torch.testing.assert_close(tau.grad, gtau)


@pytest.mark.parametrize("name", sorted(sg.SURROGATES))
def test_surrogate_primitive_derivative_pairs(name):
    """Each smooth primitive's autograd derivative is the tabulated surrogate derivative."""
    alpha = sg.SURROGATES[name].default_alpha
    z = torch.linspace(-3, 3, 601, dtype=torch.float64)
    z = z[(z.abs() - 1 / alpha).abs() > 1e-3]  # away from the kinks of the piecewise forms
    z = z[((z.abs() - alpha / 2).abs() > 1e-3)].requires_grad_()
    (d,) = torch.autograd.grad(sg.primitive(name, z, alpha).sum(), z)
    torch.testing.assert_close(d, sg.derivative(name, z.detach(), alpha))
