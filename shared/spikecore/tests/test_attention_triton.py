"""The fused SDSA kernel (``spikecore.attention._triton``) against the PyTorch path of ``sdsa``.

Without a GPU the kernels run under TRITON_INTERPRET=1 (conftest.py) on tiny shapes. The reference is
``sdsa(backend="torch")`` on the same values upcast to float32: spikes times spikes are integer counts, so
the forward is bit-exact; gradients agree up to the rounding of the input dtype.
"""

import itertools

import pytest
import torch
from spikecore_testing import requires_cuda

from spikecore.attention import SpikeDrivenSelfAttention
from spikecore.attention import _triton as AT
from spikecore.attention import functional as AF

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# On CUDA torch divides by a Python-float tau as a multiply by its reciprocal; the kernel divides exactly
# (like torch on CPU), so tau = 2.0 there keeps the reference bit-comparable.
TAU = 2.0 if DEV == "cuda" else 1.7
GRAD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def _inputs(T, B, C, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = ((torch.rand(T, B, C, N, generator=g) < 0.5) for _ in range(2))
    v = torch.rand(T, B, C, N, generator=g) < 0.3
    gy = torch.randn(T, B, C, N, generator=g)
    return [x.to(dtype).to(DEV) for x in (q, k, v, gy)]


def _run(backend, q, k, v, gy, **kw):
    ref = backend == "torch"
    leaves = [(x.float() if ref else x).detach().clone().requires_grad_() for x in (q, k, v)]
    y = AF.sdsa(*leaves, backend=backend, **kw)
    y.backward(gy.float() if ref else gy)
    return y, [x.grad for x in leaves]


def _compare(shape, dtype, *, soft=False, detach=True, surrogate="sigmoid", seed=0, **kw):
    q, k, v, gy = _inputs(*shape, dtype, seed)
    v_th = kw.pop("v_threshold", 0.5)
    if v_th == "median":  # near the median first-step membrane: about half the channels fire at t = 0
        v_th = float(((k.float() * v.float()).sum(-1)[0] / TAU).median()) + 0.25
    opts = dict(
        tau=TAU,
        v_threshold=v_th,
        v_reset=None if soft else 0.0,
        detach_reset=detach,
        surrogate=surrogate,
        **kw,
    )
    y, grads = _run("triton", q, k, v, gy, **opts)
    y_ref, grads_ref = _run("torch", q, k, v, gy, **opts)
    assert y.dtype == dtype and y.shape == q.shape
    kv_mask = (y != 0) | (q == 0)  # where the attention LIF fired (or q hides it)
    rate = (y != 0).float().sum() / (q != 0).float().sum()
    assert 0.05 < rate < 0.95, f"inputs must exercise both firing and silence (rate {rate:.3f})"
    assert kv_mask.any()
    torch.testing.assert_close(y.float(), y_ref, rtol=0, atol=0)
    rtol, atol = GRAD_TOL[dtype]
    for name, a, b in zip("qkv", grads, grads_ref, strict=True):
        assert a.dtype == dtype, name
        assert b.abs().max() > 0, f"reference grad of {name} is all zero: the test checks nothing"
        torch.testing.assert_close(a.float(), b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize(
    "soft,detach,surrogate", list(itertools.product([False, True], [True, False], ["sigmoid", "atan"]))
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdsa_triton_matches_torch(dtype, soft, detach, surrogate):
    _compare((3, 2, 5, 7), dtype, soft=soft, detach=detach, surrogate=surrogate)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdsa_triton_several_tiles(dtype, monkeypatch):
    # N = 11 over 4-token tiles (last one partial), C = 5 over 2-channel blocks (last one partial).
    monkeypatch.setattr(AT, "_MAX_BLOCK_N", 4)
    monkeypatch.setattr(AT, "_TILE", 8)
    assert AT._tiles(5, 11) == (2, 4)
    _compare(
        (4, 2, 5, 11), dtype, soft=dtype == torch.float16, detach=dtype != torch.float32, v_threshold=1.0
    )


def test_sdsa_triton_default_tiles_long_rows():
    # N = 300 > _MAX_BLOCK_N with the real tile sizes; T = 1.
    assert AT._tiles(4, 300)[1] < 300
    _compare((1, 2, 4, 300), torch.float32, v_threshold="median", seed=3)


def test_sdsa_triton_strided_inputs():
    # Non-contiguous q, k, v (a permuted view) go through .contiguous() and give the same result.
    q, k, v, gy = _inputs(3, 2, 5, 7, torch.float32, seed=1)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    y, grads = _run("triton", qt, kt, vt, gy, tau=TAU)
    y_ref, grads_ref = _run("torch", q, k, v, gy, tau=TAU)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sdsa_dispatch(monkeypatch):
    q, k, v, _gy = _inputs(2, 1, 4, 3, torch.float32)

    def boom(*a, **kw):
        raise AssertionError("the fused kernel must not run here")

    monkeypatch.setattr(AT, "sdsa_fused", boom)
    # A custom neuron (e.g. a stateful LIF module) keeps the PyTorch path, whatever the backend.
    AF.sdsa(q, k, v, neuron=lambda x: (x > 0.5).to(x.dtype), backend="triton")
    AF.sdsa(q, k, v, backend="torch")
    if DEV == "cpu":
        AF.sdsa(q, k, v, backend="auto")  # CPU tensors: auto is not the Triton kernel
    AF.sdsa(q.double(), k.double(), v.double(), backend="auto")  # float64: PyTorch path
    with pytest.raises(AssertionError, match="fused kernel"):
        AF.sdsa(q, k, v, backend="triton")
    with pytest.raises(TypeError, match="one dtype"):
        AF.sdsa(q, k.half(), v, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        AF.sdsa(q.double(), k.double(), v.double(), backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        AF.sdsa(q, k, v, backend="nope")


def test_sdsa_fused_saves_only_small_tensors():
    # What autograd keeps: q, k, v (inputs, already alive) and the fp32 membrane [T, B, C] -- no [T,B,C,N]
    # temporary of k * v.
    q, k, v, _gy = _inputs(3, 2, 5, 7, torch.float32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        AF.sdsa(q, k, v, backend="triton")
    extra = [t for t in saved if not any(t is x for x in (q, k, v))]
    assert [tuple(t.shape) for t in extra] == [(3, 2, 5)] and extra[0].dtype == torch.float32


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdsa_triton_cuda_realistic(dtype):
    # Spikformer-8-512 / SDT on ImageNet: T=4, B=32, C=512, N=14*14; counts <= 196 exact in bf16.
    _compare((4, 32, 512, 196), dtype, v_threshold="median")
    _compare((4, 32, 512, 196), dtype, soft=True, detach=False, surrogate="atan", v_threshold="median")


def test_sdsa_fused_opcheck():
    # The custom op's fake implementation, schema and autograd registration (torch.compile needs them).
    q, k, v, _gy = _inputs(2, 2, 3, 5, torch.float32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(AT._sdsa_fused_fwd, (q, k, v, 2.0, 0.5, 0.0, False, True, 0, 4.0))


def test_sdsa_module_takes_the_fused_core_and_matches_the_pytorch_core():
    """SpikeDrivenSelfAttention with backend="triton" runs its core on the fused kernel (under the
    interpreter here) and equals the same weights on the PyTorch core, forward and backward."""
    torch.manual_seed(0)
    fused = SpikeDrivenSelfAttention(8, 2, backend="triton")
    plain = SpikeDrivenSelfAttention(8, 2, backend="torch")
    plain.load_state_dict(fused.state_dict())
    for m in (fused, plain):
        for bn in (m.q_bn, m.k_bn, m.v_bn):
            torch.nn.init.constant_(bn.bias, 1.0)  # so that the small test actually fires
    x = torch.randn(3, 2, 8, 5)
    assert fused.fused_core(x) and not plain.fused_core(x)
    assert not SpikeDrivenSelfAttention(8, 2, backend="triton", stateful=True).fused_core(x)
    outs = []
    for m in (fused, plain):
        xx = x.clone().requires_grad_()
        out = m(xx)
        out.square().sum().backward()
        outs.append((out, xx.grad, m.k_conv.weight.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
