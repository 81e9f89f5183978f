"""Every fused backend against the reference loop, over the whole configuration grid.

The reference (``lif_reference``) is itself checked against finite differences in test_lif_reference.py.
The Triton backend runs under TRITON_INTERPRET=1 when there is no GPU (see conftest.py), on tiny shapes.
"""

import itertools

import pytest
import torch

import spikecore
from spikecore.neuron import _cpu_cpp
from spikecore.neuron.surrogate import SURROGATES

# cpu:avx2 (on an AVX-512 machine): the C++ kernels built as an AVX2-only machine gets them; cpu:sse4
# (x86-64-v2): the generic code paths of a NEON build (128-bit vectors, integer float16 conversions).
CPU_ISAS = [f"cpu:{isa}" for isa in _cpu_cpp.available_isas() if isa != "native"]

# Tiny shapes for the Triton interpreter; odd sizes for the CPU kernel's vector tails.
SHAPES = {"cpu": (5, 3, 37), "triton": (5, 23)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) for gradients returned in the input dtype.
GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}
CONFIGS = list(itertools.product([0.0, None], [False, True], [True, False], sorted(SURROGATES)))


@pytest.fixture(autouse=True)
def _cpu_kernels(request, monkeypatch):
    """``cpu:numba`` is the cpu backend on its numba kernels (the fallback where C++ cannot be built);
    ``cpu:<isa>`` its C++ kernels built for that vector ISA (``SPIKECORE_CPU_ISA``)."""
    params = getattr(request.node, "callspec", None)
    backend = params.params.get("backend", "") if params is not None else ""
    if backend == "cpu:numba":
        monkeypatch.setenv("SPIKECORE_CPU_KERNELS", "numba")
    elif backend.startswith("cpu:"):
        monkeypatch.setenv("SPIKECORE_CPU_KERNELS", "cpp")
        monkeypatch.setenv("SPIKECORE_CPU_ISA", backend.split(":")[1])


def _backend(name):
    return name.split(":")[0]


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _inputs(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    # Mean and spread chosen so that neurons both fire and stay silent across the steps.
    x = (torch.randn(shape, generator=g) * 1.5 + 0.6).to(dtype).to(device)
    v0 = (torch.rand(shape[1:], generator=g) * 0.8).to(device)
    gs = torch.randn(shape, generator=g).to(dtype).to(device)
    gv = torch.randn(shape[1:], generator=g).to(device)
    return x, v0, gs, gv


def _run(backend, x, v0, gs, gv, **kw):
    x = x.detach().clone().requires_grad_()
    v0 = v0.detach().clone().requires_grad_()
    s, v = spikecore.lif_multi_step(x, v0, backend=backend, **kw)
    torch.autograd.backward([s, v], [gs, gv])
    return s, v, x.grad, v0.grad


@pytest.mark.parametrize("backend", ["cpu", *CPU_ISAS, "cpu:numba", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("v_reset", "detach_reset", "decay_input", "surrogate"), CONFIGS)
def test_backend_matches_reference(backend, dtype, v_reset, detach_reset, decay_input, surrogate):
    backend = _backend(backend)
    seed = hash((backend, str(dtype), v_reset, detach_reset, decay_input, surrogate)) % 2**31
    x, v0, gs, gv = _inputs(SHAPES[backend], dtype, _device(backend), seed)
    kw = dict(
        tau=2.0,
        v_threshold=1.0,
        v_reset=v_reset,
        decay_input=decay_input,
        detach_reset=detach_reset,
        surrogate=surrogate,
    )
    s, v, gx, gv0 = _run(backend, x, v0, gs, gv, **kw)
    s_ref, v_ref, gx_ref, gv0_ref = _run("torch", x, v0, gs, gv, **kw)

    assert s.dtype == dtype and gx.dtype == dtype
    assert 0 < s.float().mean() < 1, "the inputs must exercise both firing and silence"
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-6)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(gx, gx_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(gv0, gv0_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", *CPU_ISAS, "cpu:numba", "triton", "torch"])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_segments_equal_one_run(backend, v_reset):
    """T steps as segments with v carried equal one T-step run, forward and backward (TDFormer)."""
    backend = _backend(backend)
    T, n = 7, 29
    x, v0, gs, gv = _inputs((T, n), torch.float32, _device(backend), seed=3)
    kw = dict(v_reset=v_reset, detach_reset=True, backend=backend)
    s_full, v_full, gx_full, gv0_full = _run(backend, x, v0, gs, gv, v_reset=v_reset, detach_reset=True)

    xs = x.detach().clone().requires_grad_()
    v = v0.detach().clone().requires_grad_()
    v_start = v
    outs = []
    for seg in (xs[:2], xs[2:3], xs[3:]):
        s, v = spikecore.lif_multi_step(seg, v, **kw)
        outs.append(s)
    s_seg = torch.cat(outs)
    torch.autograd.backward([s_seg, v], [gs, gv])
    torch.testing.assert_close(s_seg, s_full, rtol=0, atol=0)
    torch.testing.assert_close(v, v_full)
    torch.testing.assert_close(xs.grad, gx_full)
    torch.testing.assert_close(v_start.grad, gv0_full)


@pytest.mark.parametrize("backend", ["cpu", *CPU_ISAS, "cpu:numba", "triton"])
@pytest.mark.parametrize("decay_input", [True, False])
def test_per_neuron_tau_gradient(backend, decay_input):
    """PLIF: a learnable tau tensor (broadcast over the batch) gets the reference's gradient."""
    backend = _backend(backend)
    dev = _device(backend)
    x, v0, gs, gv = _inputs((6, 4, 9), torch.float32, dev, seed=11)
    tau0 = (1.5 + torch.rand(9)).to(dev)
    grads = {}
    for b in (backend, "torch"):
        tau = tau0.clone().requires_grad_()
        xx = x.clone().requires_grad_()
        s, v = spikecore.lif_multi_step(
            xx, v0, tau=tau, decay_input=decay_input, detach_reset=True, backend=b
        )
        torch.autograd.backward([s, v], [gs, gv])
        grads[b] = (s, v, xx.grad, tau.grad)
    for a, b in zip(grads[backend], grads["torch"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", *CPU_ISAS, "cpu:numba", "triton", "torch"])
def test_v_seq_and_any_stride(backend):
    backend = _backend(backend)
    dev = _device(backend)
    base = torch.randn(3, 11, 4, device=dev) + 0.8
    x = base.transpose(0, 1)[:, ::2]  # [11, 2, 4] viewed with odd strides: T=11 crosses chunks
    assert not x.is_contiguous()
    s, v, v_seq = spikecore.lif_multi_step(x, backend=backend, store_v_seq=True)
    s_ref, v_ref, v_seq_ref = spikecore.lif_reference(x.contiguous(), store_v_seq=True)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(v_seq, v_seq_ref)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(v_seq[-1], v)
    assert s.shape == x.shape and v_seq.shape == x.shape and v.shape == x.shape[1:]


@pytest.mark.parametrize("backend", ["cpu", *CPU_ISAS, "cpu:numba", "triton"])
def test_fp16_saves_at_most_two_bytes_per_neuron_step(backend):
    """Only x (in its dtype) is kept for backward: 2 bytes per neuron-step for fp16/bf16."""
    backend = _backend(backend)
    T, n = 4, 64
    x = torch.randn(T, n, device=_device(backend)).half().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        spikecore.lif_multi_step(x, backend=backend)
    per_step = {t.data_ptr(): t.numel() * t.element_size() for t in saved if t is not None}
    assert sum(per_step.values()) / (T * n) == 2  # x alone: no v_init given, so none is saved
