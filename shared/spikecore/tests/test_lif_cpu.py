"""The fused CPU backend (``backend="cpu"``: C++ kernels, numba where they cannot be built) against the
reference loop, float64 and spikingjelly.

The cross-backend grid (every reset/detach/decay/surrogate combination) lives in test_lif_backends.py; this
file covers what is specific to the CPU kernels: the in-kernel fp16/bf16 bit conversions, block edges (odd
N, N smaller than a block), long T, the per-neuron tau gradient, v_seq, and an independent peer.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spikecore import lif_multi_step, lif_reference
from spikecore.neuron import _cpu, _cpu_cpp


@pytest.fixture(autouse=True, params=_cpu_cpp.available_isas())
def isa(request, monkeypatch):
    """Every test on each vector ISA build of the C++ kernels that runs here: ``native``; ``avx2`` on an
    AVX-512 machine (the build an AVX2-only machine gets); ``sse4`` on x86-64 with AVX2 (x86-64-v2: the
    generic paths of a NEON build, 128-bit vectors and integer float16 conversions)."""
    monkeypatch.setenv("SPIKECORE_CPU_ISA", request.param)
    return request.param


def _run(fn, x, v0, tau, gs, gv, **kw):
    x = x.detach().clone().requires_grad_()
    v0 = v0.detach().clone().requires_grad_()
    tau_in = tau.detach().clone().requires_grad_() if isinstance(tau, torch.Tensor) else tau
    out = fn(x, v0, tau=tau_in, **kw)
    s, v = out[0], out[1]
    torch.autograd.backward([s, v], [gs, gv])
    grads = (x.grad, v0.grad, tau_in.grad if isinstance(tau_in, torch.Tensor) else None)
    return out, grads


def _inputs(T, N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, N, generator=g) * 1.5 + 0.3).to(dtype)
    v0 = torch.randn(N, generator=g) * 0.3
    gs = torch.randn(T, N, generator=g).to(dtype)
    gv = torch.randn(N, generator=g)
    return x, v0, gs, gv


def _cpu_fn(x, v0, **kw):
    return lif_multi_step(x, v0, backend="cpu", **kw)


@pytest.mark.parametrize("N", [1, 37, 1001, 70_001])
@pytest.mark.parametrize("T", [1, 4, 33])
@pytest.mark.parametrize(("tau", "decay_input"), [(1.7, True), (2.0, True), (4.0, False)])
def test_shapes_fp32_match_reference_exactly(T, N, tau, decay_input):
    """tau 1.7 divides; a power of two multiplies by its (exact) reciprocal, which must not change a bit."""
    x, v0, gs, gv = _inputs(T, N)
    kw = dict(v_reset=-0.1, detach_reset=False, surrogate="sigmoid", decay_input=decay_input)
    (s, v), (gx, gv0, _) = _run(_cpu_fn, x, v0, tau, gs, gv, **kw)
    (rs, rv), (rgx, rgv0, _) = _run(lif_reference, x, v0, tau, gs, gv, **kw)
    assert torch.equal(s, rs)  # same float32 operation order: bit-identical spikes and membrane
    assert torch.equal(v, rv)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gv0, rgv0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tau", [2.0, 0.5, 2.0**20])
@pytest.mark.parametrize("decay_input", [True, False])
def test_power_of_two_tau_is_bit_identical_down_to_subnormals(tau, decay_input):
    """A power-of-two tau is applied as a multiply by 1 / tau: the same real number as the reference's
    division, so the same float, subnormal results and their rounding included (an FMA the compiler fused
    would round those differently)."""
    g = torch.Generator().manual_seed(5)
    T, N = 6, 1003
    scale = torch.tensor([1e-44, 1e-40, 1e-38, 1e-30, 1.0, 1e30]).repeat_interleave(N // 6 + 1)[:N]
    x = torch.randn(T, N, generator=g) * scale
    v0 = torch.randn(N, generator=g) * scale
    kw = dict(tau=tau, v_threshold=float(scale.max()), v_reset=0.0, decay_input=decay_input)
    s, v = lif_multi_step(x, v0, backend="cpu", **kw)
    rs, rv = lif_reference(x, v0, **kw)
    assert (v.abs() < 1.17549435e-38).any() and (v != 0).any()  # subnormals do occur
    assert torch.equal(s, rs) and torch.equal(v, rv)


@pytest.mark.parametrize("T", [5, 12])  # the backward's vector and tile walks
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("soft", [False, True])
def test_half_dtypes(dtype, soft, T):
    N = 3001
    x, v0, gs, gv = _inputs(T, N, dtype)
    kw = dict(v_reset=None if soft else 0.0, detach_reset=True, surrogate="atan")
    (s, v), (gx, gv0, _) = _run(_cpu_fn, x, v0, 2.0, gs, gv, **kw)
    (rs, rv), (rgx, rgv0, _) = _run(lif_reference, x, v0, 2.0, gs, gv, **kw)
    assert s.dtype == dtype and gx.dtype == dtype and v.dtype == torch.float32
    assert torch.equal(s, rs)  # the kernel converts x exactly, then computes in fp32 as the reference
    assert torch.equal(v, rv)
    torch.testing.assert_close(gv0, rgv0, rtol=1e-4, atol=1e-5)
    # grad_x is rounded to the input dtype by both: at most one rounding step apart
    torch.testing.assert_close(gx.float(), rgx.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conversions_are_exact(dtype):
    # The kernels' in-register conversions against torch's: every 16-bit pattern to fp32 (exact), and fp32
    # values over the whole range (subnormals, overflow, ties, inf, nan) back with round-to-nearest-even.
    kind = _cpu._KIND[dtype]
    vals = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    out = torch.empty(vals.shape[0], dtype=torch.float32)
    _cpu._load_row(_cpu._bits(vals), kind, out.numpy(), vals.shape[0])
    ref = vals.float()
    nan = torch.isnan(ref)  # nan payloads may differ (torch quiets signalling nans); nan must stay nan
    assert torch.isnan(out[nan]).all()
    assert torch.equal(out[~nan].view(torch.int32), ref[~nan].view(torch.int32))
    g = torch.randn(400_000) * torch.logspace(-45, 38, 400_000)
    ties = vals.float()[torch.isfinite(vals.float())]
    ties = (ties + torch.nextafter(ties, torch.full_like(ties, float("inf")))) / 2  # near-halfway points
    extra = torch.tensor(
        [
            0.0,
            -0.0,
            65519.0,
            65520.0,
            1e-8,
            2.9802322e-08,
            6e-8,
            3.4e38,
            float("inf"),
            -float("inf"),
            float("nan"),
        ]
    )
    g = torch.cat([g, ties, extra]).contiguous()
    got = torch.empty(g.shape[0], dtype=dtype)
    _cpu._store_row(g.numpy(), kind, _cpu._bits(got), g.shape[0])
    want = g.to(dtype)
    nan = torch.isnan(want)
    assert torch.isnan(got[nan]).all()
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def _wide_range_fp32(dtype):
    """fp32 values over the whole range: random magnitudes 1e-45..1e38, the points halfway between
    neighbouring values of ``dtype`` (ties), and the edge cases; a length of whole vectors (16 lanes)."""
    vals = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    vals = torch.unique(vals[torch.isfinite(vals)]).double()  # sorted
    ties = ((vals[:-1] + vals[1:]) / 2).float()  # exactly halfway between neighbours (exact in fp32)
    # (no inf: grad V = inf gives nan in the kernel's fused formula, inf * 0 for the detached reset)
    edges = [0.0, -0.0, 65519.0, 65520.0, -65520.0, 1e-8, 2.9802322e-08, 6e-8, 3.4e38, -3.4e38]
    g = torch.Generator().manual_seed(3)
    rand = torch.randn(200_000, generator=g) * torch.logspace(-45, 38, 200_000)
    out = torch.cat([torch.tensor([*edges, float("nan")]), ties, rand])
    return out[: out.numel() // 16 * 16].contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_16bit_rows_convert_like_torch(dtype):
    """The C++ kernels' vector conversions (F16C, or the integer code a NEON build runs), through the op.
    Loads: every finite and nan 16-bit pattern as x, tau = 1 and an unreachable threshold: V = x in fp32.
    Stores: grad x = grad V (tau = 1, no spike, detached reset) for fp32 values over the whole range, rounded
    to nearest even. Both bit for bit against the reference loop, which converts with torch."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[~torch.isinf(x)].unsqueeze(0)  # (the reference resets inf arithmetically, to nan)
    kw = dict(tau=1.0, v_threshold=3.4e38, v_reset=0.0)
    (s, v), (rs, rv) = _cpu_fn(x, None, **kw), lif_reference(x, None, **kw)
    assert torch.equal(s.view(torch.int16), rs.view(torch.int16))
    nan = torch.isnan(rv)
    assert torch.isnan(v[nan]).all() and nan.sum() > 0
    assert torch.equal(v[~nan].view(torch.int32), rv[~nan].view(torch.int32))

    gv = _wide_range_fp32(dtype)
    grads = []
    for fn in (_cpu_fn, lif_reference):
        xg = torch.zeros(1, gv.numel(), dtype=dtype, requires_grad=True)
        s, v = fn(xg, None, tau=1.0, v_threshold=1.0, v_reset=0.0, detach_reset=True)
        torch.autograd.backward([s, v], [torch.zeros_like(s), gv])
        grads.append(xg.grad[0])
    got, want = grads
    nan = torch.isnan(want)
    assert torch.isnan(got[nan]).all() and nan.sum() > 0
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("T", [6, 12])  # the backward's vector and tile walks
@pytest.mark.parametrize("decay_input", [True, False])
def test_per_neuron_tau_gradient(decay_input, T):
    N = 513
    x, v0, gs, gv = _inputs(T, N)
    tau = torch.rand(N) * 2 + 1.1
    kw = dict(v_reset=0.0, detach_reset=False, surrogate="sigmoid", decay_input=decay_input)
    (s, v), grads = _run(_cpu_fn, x, v0, tau, gs, gv, **kw)
    (rs, rv), rgrads = _run(lif_reference, x, v0, tau, gs, gv, **kw)
    assert torch.equal(s, rs) and torch.equal(v, rv)
    for g, rg in zip(grads, rgrads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)
    # a broadcast tau (one per channel) gets its gradient summed over the broadcast neurons
    x4, tau_c = x.view(T, 27, 19), tau[:19].clone()
    (_, _), (_, _, gt) = _run(_cpu_fn, x4, v0.view(27, 19), tau_c, gs.view(T, 27, 19), gv.view(27, 19), **kw)
    (_, _), (_, _, rgt) = _run(
        lif_reference, x4, v0.view(27, 19), tau_c, gs.view(T, 27, 19), gv.view(27, 19), **kw
    )
    torch.testing.assert_close(gt, rgt, rtol=1e-4, atol=1e-4)


def test_v_seq_and_segments():
    T, N = 9, 1000 + 1
    x, v0, _, _ = _inputs(T, N)
    s, v, vs = lif_multi_step(x, v0, v_reset=None, backend="cpu", store_v_seq=True)
    rs, rv, rvs = lif_reference(x, v0, v_reset=None, store_v_seq=True)
    assert torch.equal(vs, rvs) and torch.equal(v, rv) and torch.equal(s, rs)
    assert torch.equal(vs[-1], v)
    # running T steps as two segments with v carried equals one run
    s1, v1 = lif_multi_step(x[:4], v0, v_reset=None, backend="cpu")
    s2, v2 = lif_multi_step(x[4:], v1, v_reset=None, backend="cpu")
    assert torch.equal(torch.cat([s1, s2]), s) and torch.equal(v2, v)


@pytest.mark.parametrize("T", [4, 33])
def test_matches_spikingjelly_lifnode(T):
    from spikingjelly.activation_based import neuron as sj
    from spikingjelly.activation_based import surrogate

    N = 4099
    x, _, gs, _ = _inputs(T, N)
    # spikingjelly 2.0's LIFNode has no backend argument: on the CPU it runs its own torch loop.
    node = sj.LIFNode(tau=2.0, step_mode="m", detach_reset=True, surrogate_function=surrogate.Sigmoid())
    xs = x.clone().requires_grad_()
    s_sj = node(xs)
    s_sj.backward(gs)
    xo = x.clone().requires_grad_()
    s, _ = lif_multi_step(xo, tau=2.0, detach_reset=True, surrogate="sigmoid", backend="cpu")
    s.backward(gs)
    assert torch.equal(s, s_sj)
    torch.testing.assert_close(xo.grad, xs.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("N", [37, 8001])  # a vector tail, and a 16-lane AVX-512 tail
def test_sigmoid_surrogate_is_accurate_over_its_whole_range(N):
    """grad x = sigma'(H - V_th) / tau for one step; H - V_th on an exact grid from -16 to 16 (a z up to 64).
    Against float64 of the symmetric form a e / (1 + e)^2, e = exp(-|a z|), to a few ulp: the tails too,
    where a s (1 - s) in float32 rounds to 0 once s rounds to 1."""
    z = torch.linspace(-16, 16, N, dtype=torch.float64)
    z = torch.round(z * 256) / 256  # exact in float32, and so are H = 1 + z and x = 2 H
    x = (2 * (1 + z)).float().unsqueeze(0).requires_grad_()
    s, _ = lif_multi_step(x, tau=2.0, detach_reset=True, surrogate="sigmoid", alpha=4.0, backend="cpu")
    s.backward(torch.ones_like(s))
    e = torch.exp(-torch.abs(4.0 * z))
    expected = 4.0 * e / (1 + e) ** 2 / 2.0
    got = x.grad[0].double()
    assert (got > 0).all()
    torch.testing.assert_close(got, expected, rtol=5e-7, atol=0)


def test_threads_and_empty():
    x, v0, _, _ = _inputs(3, 0)
    s, v = lif_multi_step(x, v0, backend="cpu")
    assert s.shape == (3, 0) and v.shape == (0,)
    x, v0, _, _ = _inputs(4, 5000)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        s1, v1 = lif_multi_step(x, v0, backend="cpu")
    finally:
        torch.set_num_threads(old)
    s2, v2 = lif_multi_step(x, v0, backend="cpu")
    assert torch.equal(s1, s2) and torch.equal(v1, v2)


def test_the_cpu_kernels_leave_torchs_thread_count_alone():
    """numba's OpenMP start-up (its first launch in a process) resizes the pool torch shares; the op must
    restore the user's setting. A fresh process, since only the first launch does it."""
    code = (
        "import torch, spikecore\n"
        "torch.set_num_threads(1)\n"
        "x = (torch.randn(4, 300) + 0.8).requires_grad_()\n"
        "s, _ = spikecore.lif_multi_step(x, backend='cpu')\n"
        "s.sum().backward()\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "1"


_HUGE_PAGE_PROBE = """
import sys
from pathlib import Path

import torch

from spikecore import lif_multi_step


def vm_flags(address):
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    sys.exit(f"no mapping holds {address:#x}")


def advised(t):
    two_mib = 2**21
    return "hg" in vm_flags((t.data_ptr() + two_mib - 1) // two_mib * two_mib)


small, _ = lif_multi_step(torch.zeros(4, 2**20), backend="cpu")  # 16 MiB: left alone
x = torch.zeros(8, 2**20, requires_grad=True)  # 32 MiB
s, _ = lif_multi_step(x, backend="cpu")
s.backward(torch.ones_like(s))
print(advised(small), advised(s), advised(x.grad))
"""


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage").exists(), reason="Linux transparent huge pages only"
)
@pytest.mark.parametrize("env", [None, "0"])
def test_large_outputs_ask_for_huge_pages(env, isa):
    """Outputs of 32 MiB and more get MADV_HUGEPAGE ('hg' in /proc/self/smaps) before the kernel writes
    them, spikes and grad x alike; SPIKECORE_CPU_HUGEPAGES=0 turns it off. (glibc maps such allocations
    afresh; the advice spares the kernel faulting them in 4 KiB at a time.) Each case runs in a fresh process:
    in a process that already advised some memory, a later allocation may reuse an advised region."""
    import os

    environ = {k: v for k, v in os.environ.items() if k != "SPIKECORE_CPU_HUGEPAGES"}
    environ["SPIKECORE_CPU_ISA"] = isa
    if env is not None:
        environ["SPIKECORE_CPU_HUGEPAGES"] = env
    run = subprocess.run(
        [sys.executable, "-c", _HUGE_PAGE_PROBE], capture_output=True, text=True, env=environ, timeout=600
    )
    assert run.returncode == 0, run.stderr
    small, spikes, grad_x = run.stdout.split()[-3:]
    assert small == "False"
    assert spikes == grad_x == str(env is None)
