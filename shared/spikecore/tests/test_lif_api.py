"""The public LIF API: input checking, backend choice, the module, and torch.compile/custom-op plumbing."""

import pytest
import torch

import spikecore
from spikecore.neuron import ops


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: spikecore.lif_multi_step(torch.ones(4, 3, dtype=torch.int32)), TypeError, "floating-point"),
        (lambda: spikecore.lif_multi_step(torch.ones(4, 3).double(), backend="cpu"), TypeError, "float64"),
        (lambda: spikecore.lif_multi_step([[1.0]]), TypeError, "torch.Tensor"),
        (lambda: spikecore.lif_multi_step(torch.ones(0, 3)), ValueError, "T >= 1"),
        (lambda: spikecore.lif_multi_step(torch.ones(())), ValueError, "T >= 1"),
        (lambda: spikecore.lif_multi_step(torch.ones(4, 3), torch.zeros(2)), ValueError, "v_init has shape"),
        (
            lambda: spikecore.lif_multi_step(torch.ones(4, 3), surrogate="sigmod"),
            ValueError,
            "unknown surrogate",
        ),
        (lambda: spikecore.lif_multi_step(torch.ones(4, 3), alpha=-1.0), ValueError, "alpha"),
        (lambda: spikecore.lif_multi_step(torch.ones(4, 3), tau=0.0), ValueError, "tau must be positive"),
        (lambda: spikecore.lif_multi_step(torch.ones(4, 3), backend="cuda"), ValueError, "unknown backend"),
        (lambda: spikecore.lif_multi_step(torch.ones(4, 3), tau=torch.ones(2)), ValueError, "broadcast"),
        (lambda: spikecore.LIF(surrogate="nope"), ValueError, "unknown surrogate"),
        (lambda: spikecore.LIF(tau=0.0), ValueError, "tau must be positive"),
        (lambda: spikecore.LIF(backend="gpu"), ValueError, "unknown backend"),
    ],
)
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_auto_backend_choice():
    x = torch.randn(2, 3)
    assert ops._choose_backend(x, "auto") == "cpu"
    assert ops._choose_backend(x.double(), "auto") == "torch"
    if torch.cuda.is_available():
        assert ops._choose_backend(x.cuda(), "auto") == "triton"


def test_float64_auto_runs_the_reference():
    x = torch.randn(5, 8, dtype=torch.float64)
    s, v = spikecore.lif_multi_step(x)
    s_ref, v_ref = spikecore.lif_reference(x)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(v, v_ref)


def test_stateless_module_does_not_leak_between_calls():
    lif = spikecore.LIF()
    x = torch.randn(4, 2, 5) + 0.8
    torch.testing.assert_close(lif(x), lif(x))
    assert lif.v is None


def test_stateful_module_carries_v_and_refuses_a_forgotten_reset():
    x = torch.randn(6, 2, 5) + 0.8
    lif = spikecore.LIF(stateful=True)
    carried = torch.cat([lif(x[:2]), lif(x[2:])])
    torch.testing.assert_close(carried, spikecore.lif_multi_step(x)[0])
    with pytest.raises(RuntimeError, match="reset"):
        lif(torch.randn(4, 3, 5))  # a new batch size with the old state
    spikecore.reset(torch.nn.Sequential(lif))
    assert lif.v is None
    lif(torch.randn(4, 3, 5))


def test_learnable_tau_module_gets_the_reference_gradient():
    x = torch.randn(5, 3, 4) + 0.5
    lif = spikecore.LIF(tau=3.0, learnable_tau=True, detach_reset=True)
    assert abs(float(lif.tau.detach()) - 3.0) < 1e-6
    lif(x).sum().backward()
    w = lif.w.detach().clone().requires_grad_()
    s, _ = spikecore.lif_reference(x, tau=1 / torch.sigmoid(w), detach_reset=True)
    s.sum().backward()
    torch.testing.assert_close(lif.w.grad, w.grad, rtol=1e-4, atol=1e-6)


def test_v_seq_is_kept_only_when_asked():
    x = torch.randn(3, 4) + 1
    lif = spikecore.LIF(store_v_seq=True)
    lif(x)
    assert lif.v_seq.shape == x.shape
    assert spikecore.LIF()(x) is not None and spikecore.LIF().v_seq is None


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_custom_ops_pass_opcheck(backend):
    """Schema, fake (meta) implementation and autograd registration agree with the real kernels."""
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    x = (torch.randn(5, 17, device=dev) + 0.7).requires_grad_()
    v0 = torch.rand(17, device=dev).requires_grad_()
    tau_t = (torch.rand(17, device=dev) + 1.5).requires_grad_()
    for v_init, tau in ((v0, tau_t), (None, None)):  # given state and PLIF tau; zeros and a float tau
        args = (x, v_init, tau, 2.0, 1.0, 0.0, False, True, True, 0, 4.0, True, backend)
        torch.library.opcheck(
            torch.ops.spikecore.lif_fwd.default,
            args,
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )
        # the backward op's fake shapes too: grad v_init is [N] with a v_init, [0] without one
        saved = torch.ops.spikecore.lif_fwd.default(*args)[3]
        grad_s = torch.randn(5, 17, device=dev)
        bwd_args = (grad_s, None, x.detach(), v_init, tau, saved, 2.0, 1.0, 0.0, False, True, True, 0, 4.0)
        bwd_args += (tau is not None, backend)
        torch.library.opcheck(
            torch.ops.spikecore.lif_bwd.default, bwd_args, test_utils=("test_schema", "test_faketensor")
        )
        grad_v_init = torch.ops.spikecore.lif_bwd.default(*bwd_args)[1]
        assert grad_v_init.shape == ((17,) if v_init is not None else (0,))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_eager_path_equals_the_registered_op(backend):
    """Eager calls skip the custom op's dispatch (ops._EagerLIF); the registered op (what torch.compile
    traces) must give the same outputs and gradients, for given state, PLIF tau and a v_final gradient."""
    from spikecore.neuron import ops

    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    leaves = [
        (torch.randn(6, 19, generator=g) + 0.7).to(dev),
        torch.rand(19, generator=g).to(dev),
        (torch.rand(19, generator=g) + 1.5).to(dev),
    ]
    gs, gv = torch.randn(6, 19, generator=g).to(dev), torch.randn(19, generator=g).to(dev)
    results = []
    for call in (ops._EagerLIF.apply, ops._lif_fwd):
        x, v0, tau = (t.clone().requires_grad_() for t in leaves)
        s, v, _, _ = call(x, v0, tau, 2.0, 1.0, 0.0, False, True, False, 0, 4.0, False, backend)
        torch.autograd.backward([s, v], [gs, gv])
        results.append((s, v, x.grad, v0.grad, tau.grad))
    for eager, registered in zip(*results, strict=True):
        torch.testing.assert_close(eager, registered, rtol=0, atol=0)


def test_torch_compile_traces_the_op():
    def f(x, v0):
        s, v = spikecore.lif_multi_step(x, v0, detach_reset=True, backend="cpu")
        return s.sum(0) * 2 + v

    x = torch.randn(4, 6, 5) + 0.6
    v0 = torch.rand(6, 5)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_e, out_c = f(xe, v0), compiled(xc, v0)
    torch.testing.assert_close(out_c, out_e)
    out_e.sum().backward()
    out_c.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)


def test_torch_compile_with_inductor_on_a_model():
    """The default compiler (Inductor, C++ on CPU) builds a model around the custom op: same outputs and
    gradients as eager (about 15 s of compilation on 2 cores)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    lif = spikecore.LIF(detach_reset=True)

    def f(x):
        return lif(model(x)).sum(0)

    x = torch.randn(4, 3, 8, requires_grad=True)
    out_c = torch.compile(f, fullgraph=True)(x)
    out_c.sum().backward()
    grad_c, x.grad = x.grad, None
    out_e = f(x)
    out_e.sum().backward()
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    torch.testing.assert_close(grad_c, x.grad)
