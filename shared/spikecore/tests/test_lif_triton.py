"""Triton-specific checks of the fused LIF (``backend="triton"``) against the reference loop.

Without a GPU the kernels run under TRITON_INTERPRET=1 (conftest.py) on tiny shapes. The full
configuration grid across backends lives in test_lif_backends.py; this file covers what is specific to the
Triton kernels: the chunked checkpoint path (T longer than one chunk), T=1, odd N, N=0, dtypes, PLIF tau,
v_seq, strides, and the bytes saved for backward.
"""

import itertools

import pytest
import torch

import spikecore
from spikecore.neuron import _triton
from spikecore.neuron.surrogate import SURROGATES

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# On CUDA, torch divides by a Python-float tau as a multiply by its reciprocal, the kernels (like torch on
# CPU) divide exactly: the float-tau tests use tau = 2.0 there so that the reference is bit-comparable.
TAU = 2.0 if DEV == "cuda" else 1.7
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def _inputs(T, N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, N, generator=g) * 1.5 + 0.6).to(dtype).to(DEV)
    v0 = (torch.rand(N, generator=g) * 0.8).to(DEV)
    gs = torch.randn(T, N, generator=g).to(dtype).to(DEV)
    gv = torch.randn(N, generator=g).to(DEV)
    return x, v0, gs, gv


def _run(backend, x, v0, gs, gv, tau=2.0, store_v_seq=False, **kw):
    """Forward + backward; the reference runs on x upcast to fp32 (same values as the fused input)."""
    ref = backend == "torch"
    x = (x.detach().float() if ref else x.detach()).clone().requires_grad_()
    v0 = v0.detach().clone().requires_grad_()
    tau_leaf = tau.detach().clone().requires_grad_() if isinstance(tau, torch.Tensor) else tau
    fn = spikecore.lif_reference if ref else spikecore.lif_multi_step
    extra = {} if ref else {"backend": backend}
    out = fn(x, v0, tau=tau_leaf, store_v_seq=store_v_seq, **kw, **extra)
    s, v = out[0], out[1]
    torch.autograd.backward([s, v], [gs.float() if ref else gs, gv])
    gtau = tau_leaf.grad if isinstance(tau_leaf, torch.Tensor) else None
    return dict(s=s, v=v, gx=x.grad, gv0=v0.grad, gtau=gtau, v_seq=out[2] if store_v_seq else None)


def _check(out, ref, dtype=torch.float32):
    assert out["s"].dtype == dtype and out["gx"].dtype == dtype
    assert 0 < out["s"].float().mean() < 1, "inputs must exercise both firing and silence"
    # Same fp32 arithmetic in the same order: spikes and membrane are bit-exact.
    torch.testing.assert_close(out["s"].float(), ref["s"].float(), rtol=0, atol=0)
    torch.testing.assert_close(out["v"], ref["v"], rtol=0, atol=0)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(out["gx"].float(), ref["gx"].float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(out["gv0"], ref["gv0"], rtol=1e-5, atol=1e-5)
    if ref["gtau"] is not None:
        torch.testing.assert_close(out["gtau"], ref["gtau"], rtol=1e-4, atol=1e-5)
    if ref["v_seq"] is not None:
        torch.testing.assert_close(out["v_seq"], ref["v_seq"], rtol=0, atol=0)


# Every surrogate once, paired with every (reset, detach, decay_input) combination once.
_COMBOS = list(itertools.product([0.0, None], [False, True], [True, False]))
_CASES = [(name, *combo) for name, combo in zip(sorted(SURROGATES), _COMBOS, strict=True)]


@pytest.mark.parametrize(("surrogate", "v_reset", "detach_reset", "decay_input"), _CASES)
def test_fp32_every_surrogate_and_reset_mode(surrogate, v_reset, detach_reset, decay_input):
    x, v0, gs, gv = _inputs(5, 67, seed=len(surrogate))
    kw = dict(
        v_threshold=0.9,
        v_reset=v_reset,
        detach_reset=detach_reset,
        decay_input=decay_input,
        surrogate=surrogate,
        store_v_seq=True,
        tau=TAU,
    )
    _check(_run("triton", x, v0, gs, gv, **kw), _run("torch", x, v0, gs, gv, **kw))


@pytest.mark.parametrize("T", [1, 3, 16, 17, 33])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_time_lengths_and_checkpoints(T, v_reset):
    """T=1, T not a power of 2, and T longer than one chunk (the membrane checkpoint path)."""
    x, v0, gs, gv = _inputs(T, 41, seed=T)
    kw = dict(v_reset=v_reset, detach_reset=False, store_v_seq=True)
    _check(_run("triton", x, v0, gs, gv, **kw), _run("torch", x, v0, gs, gv, **kw))
    C = _triton._chunk(T)
    assert _triton.n_saved(T) == -(-T // C) - 1
    saved = _triton.lif_fwd(x, v0, None, 2.0, 1.0, 0.0, v_reset is None, True, False)[3]
    assert saved.shape == (_triton.n_saved(T), 41) and saved.dtype == torch.float32
    if _triton.n_saved(T):  # checkpoint k is V at the start of chunk k + 1
        v_seq = spikecore.lif_reference(x, v0, v_reset=v_reset, store_v_seq=True)[2]
        torch.testing.assert_close(saved, v_seq[C - 1 : T - 1 : C], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [4, 19])
def test_half_dtypes(dtype, T):
    x, v0, gs, gv = _inputs(T, 53, dtype, seed=3)
    kw = dict(detach_reset=True, surrogate="atan")
    _check(_run("triton", x, v0, gs, gv, **kw), _run("torch", x, v0, gs, gv, **kw), dtype)


@pytest.mark.parametrize("decay_input", [True, False])
@pytest.mark.parametrize("T", [5, 18])
def test_per_neuron_tau_gradient(decay_input, T):
    x, v0, gs, gv = _inputs(T, 45, seed=11)
    tau = (1.2 + 2 * torch.rand(45, generator=torch.Generator().manual_seed(5))).to(DEV)
    kw = dict(tau=tau, decay_input=decay_input, v_reset=None if decay_input else 0.0)
    _check(_run("triton", x, v0, gs, gv, **kw), _run("torch", x, v0, gs, gv, **kw))


def test_broadcast_tau_non_contiguous_input_and_shape():
    g = torch.Generator().manual_seed(7)
    base = (torch.randn(3, 5, 4, 6, generator=g) * 1.5 + 0.6).to(DEV)
    x = base.permute(1, 0, 3, 2)  # [T=5, 3, 6, 4], non-contiguous
    assert not x.is_contiguous()
    tau = (1.5 + torch.rand(3, 1, 4, generator=g)).to(DEV)  # broadcasts over the neuron shape
    v0 = torch.rand(3, 6, 4, generator=g).to(DEV)
    outs = []
    for backend in ("triton", "torch"):
        xl, vl, tl_ = (t.detach().clone().requires_grad_() for t in (x, v0, tau))
        s, v, vs = spikecore.lif_multi_step(xl, vl, tau=tl_, backend=backend, store_v_seq=True)
        (s.sum() + (v * v).sum()).backward()
        outs.append((s, v, vs, xl.grad, vl.grad, tl_.grad))
    for a, b in zip(*outs, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_segments_equal_one_run():
    x, v0, gs, gv = _inputs(6, 29, seed=2)
    full = _run("triton", x, v0, gs, gv)
    xa, xb = (t.detach().clone().requires_grad_() for t in (x[:3], x[3:]))
    v0l = v0.detach().clone().requires_grad_()
    sa, va = spikecore.lif_multi_step(xa, v0l, backend="triton")
    sb, vb = spikecore.lif_multi_step(xb, va, backend="triton")
    torch.autograd.backward([sa, sb, vb], [gs[:3], gs[3:], gv])
    torch.testing.assert_close(torch.cat([sa, sb]), full["s"], rtol=0, atol=0)
    torch.testing.assert_close(vb, full["v"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([xa.grad, xb.grad]), full["gx"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v0l.grad, full["gv0"], rtol=1e-6, atol=1e-6)


def test_empty_neurons():
    x = torch.zeros(3, 0, device=DEV, requires_grad=True)
    s, v, vs = spikecore.lif_multi_step(x, backend="triton", store_v_seq=True)
    assert s.shape == (3, 0) and v.shape == (0,) and vs.shape == (3, 0)
    s.sum().backward()
    assert x.grad.shape == (3, 0)


@pytest.mark.parametrize("T", [4, 40])
def test_saved_bytes_are_x_v_init_and_checkpoints(T):
    N = 64
    x = torch.randn(T, N, device=DEV).half().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s, v = spikecore.lif_multi_step(x, backend="triton")
    per_neuron_step = sum(saved) / (T * N)
    # x in fp16 (2 bytes) + v_init (4 bytes per neuron) + fp32 checkpoints; nothing per step beyond x.
    assert per_neuron_step <= 2 + 4 * (1 + _triton.n_saved(T)) / T
    assert per_neuron_step < 3.1
    (s.float().sum() + v.sum()).backward()  # the saved tensors are enough for the backward


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_large_fp16():
    T, N = 4, 4_200_000
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(T, N, device="cuda", generator=g) * 1.5 + 0.6).half()
    v0 = torch.rand(N, device="cuda", generator=g) * 0.8
    gs = torch.randn(T, N, device="cuda", generator=g).half()
    gv = torch.randn(N, device="cuda", generator=g)
    kw = dict(detach_reset=True)  # tau = 2.0: the reference's scalar division is exact on CUDA too
    _check(_run("triton", x, v0, gs, gv, **kw), _run("torch", x, v0, gs, gv, **kw), torch.float16)
