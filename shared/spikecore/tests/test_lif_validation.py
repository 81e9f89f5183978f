"""A tensor tau obeys the float tau's rule, and one set of tau shapes, on every LIF backend (issue 11).

The rule (``ops._check_tau``): tau > 0 (NaN refused, inf allowed), for a float and at every element of a
tensor; a tensor tau must broadcast to the neuron shape ``x.shape[1:]`` without adding dimensions. Results
are checked against ``_loop`` below, a plain float64 loop written here (independent of spikecore), on inputs
chosen so that float32 and float64 arithmetic agree exactly: x on a 1/8 grid, tau in {1, 2, 4, inf}, T = 4,
and a threshold no such membrane value can equal. The Triton backend runs under TRITON_INTERPRET=1 without
a GPU (conftest.py), on tiny shapes.
"""

import math

import pytest
import torch

import spikecore
from spikecore.neuron import ops

NAN, INF = float("nan"), float("inf")
V_TH = 0.97  # no multiple of 2^-11 is within float32 rounding of it: no ties at the threshold
# (backend, dtype): float64 runs the reference loop ("auto" picks "torch" for it), the others the kernels.
PATHS = [
    ("auto", torch.float64),
    ("torch", torch.float32),
    ("cpu", torch.float32),
    ("cpu:numba", torch.float32),
    ("triton", torch.float32),
]
PATH_IDS = [f"{b}-{str(d).removeprefix('torch.')}" for b, d in PATHS]


@pytest.fixture(autouse=True)
def _cpu_kernels(request, monkeypatch):
    """``cpu:numba`` is the cpu backend on its numba kernels (the fallback where C++ cannot be built)."""
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("path", (None,))[0] == "cpu:numba":
        monkeypatch.setenv("SPIKECORE_CPU_KERNELS", "numba")


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _x(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-6, 20, shape, generator=g) / 8).to(dtype).to(device)


def _loop(x, tau, v_threshold=V_TH, v_reset=0.0, decay_input=True):
    """The LIF equations, step by step, in float64, with tau explicitly expanded to the neuron shape."""
    x = x.detach().cpu().double()
    tau = torch.as_tensor(tau, dtype=torch.float64).detach().cpu().expand(x.shape[1:])
    v = torch.zeros(x.shape[1:], dtype=torch.float64)
    spikes = []
    for t in range(x.shape[0]):
        if decay_input:
            h = v + (x[t] - (v - v_reset)) / tau
        else:
            h = v - (v - v_reset) / tau + x[t]
        s = (h >= v_threshold).double()
        v = s * v_reset + (1 - s) * h
        spikes.append(s)
    return torch.stack(spikes), v


def _lif(x, path, **kw):
    backend = path[0].split(":")[0]
    return spikecore.lif_multi_step(x, backend=backend, v_threshold=V_TH, **kw)


# -- values: a tensor tau is refused exactly where the same float is -----------------------------------


@pytest.mark.parametrize("value", [0.0, -0.0, -1.5, -INF, NAN])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_a_bad_tau_is_refused_as_float_and_as_tensor(path, value):
    x = _x((4, 3), path[1], _device(path[0]))
    with pytest.raises(ValueError, match="tau must be positive") as as_float:
        _lif(x, path, tau=value)
    assert repr(value) in str(as_float.value) or str(value) in str(as_float.value)
    for tau in (torch.tensor(value), torch.full((3,), value), torch.tensor(value, requires_grad=True)):
        with pytest.raises(ValueError, match="tau must be positive") as as_tensor:
            _lif(x, path, tau=tau)
        assert f"{tau.numel()} of {tau.numel()} values" in str(as_tensor.value)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_a_per_neuron_tau_with_a_few_bad_values_names_them(path):
    x = _x((4, 2, 8), path[1], _device(path[0]))
    tau = torch.full((8,), 2.0, dtype=torch.float64)
    tau[[1, 4, 6]] = torch.tensor([-3.0, NAN, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"tau must be positive") as err:
        _lif(x, path, tau=tau)
    msg = str(err.value)
    assert "3 of 8 values" in msg and "(8,)" in msg
    assert "-3.0" in msg and "nan" in msg and "0.0" in msg
    assert "inf allowed" in msg  # says what is allowed, not only what is wrong


@pytest.mark.parametrize("decay_input", [True, False])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_an_infinite_tau_is_allowed_as_float_and_as_tensor(path, decay_input):
    """The float rule is tau > 0, so inf passes (decay_input=False: a neuron with no leak); a tensor too."""
    x = _x((4, 2, 3), path[1], _device(path[0]), seed=1)
    tau = torch.tensor([INF, 2.0, INF])
    s_ref, v_ref = _loop(x, tau, decay_input=decay_input)
    s, v = _lif(x, path, tau=tau.to(x.device), decay_input=decay_input)
    torch.testing.assert_close(s.cpu().double(), s_ref, rtol=0, atol=0)
    torch.testing.assert_close(v.cpu().double(), v_ref, rtol=0, atol=0)
    s_inf, _ = _lif(x, path, tau=INF, decay_input=decay_input)
    torch.testing.assert_close(
        s_inf.cpu().double(), _loop(x, INF, decay_input=decay_input)[0], rtol=0, atol=0
    )


def test_a_tau_between_0_and_1_is_allowed_like_the_float():
    """The float rule has no tau >= 1 floor (only LIF's learnable tau needs > 1); nor has the tensor."""
    x = _x((4, 5), torch.float32, "cpu")
    s_ref, v_ref = _loop(x, 0.5)
    for tau in (0.5, torch.tensor(0.5), torch.full((5,), 0.5)):
        s, v = spikecore.lif_multi_step(x, tau=tau, v_threshold=V_TH)
        torch.testing.assert_close(s.double(), s_ref, rtol=0, atol=0)
        torch.testing.assert_close(v.double(), v_ref, rtol=0, atol=0)


def test_checking_a_learnable_tau_keeps_its_gradient():
    """The value check runs detached: a requires-grad tau still gets the reference's gradient."""
    x = _x((5, 3, 4), torch.float32, "cpu") + 0.1
    tau0 = torch.tensor([1.5, 2.5, 3.0, 4.0])
    grads = []
    for fn in (spikecore.lif_multi_step, spikecore.lif_reference):
        tau = tau0.clone().requires_grad_()
        s, v = fn(x, tau=tau, detach_reset=True)
        (s.sum() + v.sum()).backward()
        grads.append(tau.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_tau_values_are_checked_per_call_but_not_for_the_module_learnable_tau(monkeypatch):
    """``lif_multi_step`` checks a tensor tau on every call; ``LIF(learnable_tau=True)`` checks at
    construction and never in forward (its 1 / sigmoid(w) is >= 1 by construction; no per-step sync)."""
    calls = []
    real = ops._check_tau_values
    monkeypatch.setattr(ops, "_check_tau_values", lambda tau: calls.append(tau) or real(tau))
    x = _x((3, 2, 4), torch.float32, "cpu")
    spikecore.lif_multi_step(x, tau=torch.full((4,), 2.0))
    assert len(calls) == 1
    lif = spikecore.LIF(tau=3.0, learnable_tau=True)
    lif(x).sum().backward()
    assert len(calls) == 1 and lif.w.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(tau=NAN), ValueError, "tau must be positive"),
        (dict(tau=-2.0), ValueError, "tau must be positive"),
        (dict(tau=torch.tensor(-2.0)), ValueError, "tau must be positive"),
        (dict(tau=torch.tensor(NAN)), ValueError, "tau must be positive"),
        (dict(tau=torch.full((3,), 2.0)), TypeError, "per-neuron tau call spikecore.lif_multi_step"),
        (dict(tau=1.0, learnable_tau=True), ValueError, "finite initial tau > 1"),
        (dict(tau=NAN, learnable_tau=True), ValueError, "finite initial tau > 1"),
        (dict(tau=INF, learnable_tau=True), ValueError, "finite initial tau > 1"),
    ],
)
def test_the_module_refuses_a_bad_tau_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        spikecore.LIF(**kwargs)


def test_the_module_takes_a_one_element_tensor_tau_as_its_float():
    x = _x((4, 2, 3), torch.float32, "cpu")
    lif = spikecore.LIF(tau=torch.tensor(4.0), v_threshold=V_TH)
    assert lif.tau == 4.0
    torch.testing.assert_close(lif(x).double(), _loop(x, 4.0)[0], rtol=0, atol=0)


# -- shapes: one supported set on every backend, identical results, output shape = input shape -------------

# (x shape, tau shape): 0-d, per neuron, per neuron with size-1 dims, per channel.
GOOD_SHAPES = [
    ((4, 2, 3), ()),
    ((4, 2, 3), (3,)),
    ((4, 2, 3), (2, 3)),
    ((4, 2, 3), (1, 3)),
    ((4, 2, 3), (2, 1)),
    ((4, 2, 3, 2, 2), (3, 1, 1)),
]
# A per-time-step [T, ...] tau, extra leading dimensions, and plain mismatches.
BAD_SHAPES = [
    ((4, 2, 3), (4, 2, 3)),
    ((4, 2, 3), (4, 1, 1)),
    ((4, 2, 3), (4, 1)),
    ((4, 2, 3), (1, 2, 3)),
    ((4, 2, 3), (2,)),
    ((4, 3), (4, 3)),
    ((4, 3), (1, 3)),
    ((4,), (1,)),
    ((4,), (4,)),
]


def _tau_of_shape(shape, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([1.0, 2.0, 4.0])[torch.randint(0, 3, shape, generator=g)]


@pytest.mark.parametrize(("x_shape", "tau_shape"), GOOD_SHAPES, ids=str)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_supported_tau_shapes_match_the_loop_on_every_backend(path, x_shape, tau_shape):
    x = _x(x_shape, path[1], _device(path[0]), seed=3)
    tau = _tau_of_shape(tau_shape)
    s_ref, v_ref = _loop(x, tau)
    s, v, v_seq = _lif(x, path, tau=tau.to(x.device), store_v_seq=True)
    assert s.shape == x.shape and v_seq.shape == x.shape and v.shape == x.shape[1:]
    assert s.dtype == x.dtype
    torch.testing.assert_close(s.cpu().double(), s_ref, rtol=0, atol=0)
    torch.testing.assert_close(v.cpu().double(), v_ref, rtol=0, atol=0)
    assert 0 < s_ref.sum() < s_ref.numel()  # the case has both spikes and silence


@pytest.mark.parametrize(("x_shape", "tau_shape"), BAD_SHAPES, ids=str)
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_unsupported_tau_shapes_are_refused_on_every_backend(path, x_shape, tau_shape):
    x = _x(x_shape, path[1], _device(path[0]))
    tau = torch.full(tau_shape, 2.0, device=x.device)
    with pytest.raises(ValueError, match=r"does not broadcast to the neuron shape") as err:
        _lif(x, path, tau=tau)
    assert str(tuple(tau_shape)) in str(err.value) and str(tuple(x_shape[1:])) in str(err.value)


@pytest.mark.parametrize(("x_shape", "tau_shape"), BAD_SHAPES, ids=str)
def test_the_reference_refuses_unsupported_tau_shapes_too(x_shape, tau_shape):
    with pytest.raises(ValueError, match="does not broadcast to the neuron shape"):
        spikecore.lif_reference(torch.ones(x_shape, dtype=torch.float64), tau=torch.full(tau_shape, 2.0))


def test_a_bad_tau_shape_is_refused_before_its_values_are_read():
    """Shape first: the error for a [T, ...] tau with bad values names the shape (what the user must fix)."""
    with pytest.raises(ValueError, match="does not broadcast"):
        spikecore.lif_multi_step(torch.ones(4, 3), tau=torch.full((4, 3), NAN))


def test_torch_compile_traces_a_tensor_tau_without_graph_breaks():
    """The value check needs real values, so it is skipped while tracing; the shape check stays and must
    not break the graph (fullgraph=True)."""

    def f(x, tau):
        s, v = spikecore.lif_multi_step(x, tau=tau, backend="cpu", detach_reset=True)
        return s.sum(0) + v

    x = _x((4, 2, 3), torch.float32, "cpu") + 0.2
    tau = _tau_of_shape((3,))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, tau), f(x, tau))
    with pytest.raises(Exception, match="does not broadcast"):
        compiled(x, _tau_of_shape((4, 2, 3)))


def test_float64_with_a_per_neuron_tau_matches_float32_kernels():
    """The original report: float64 input (the reference path) and the fused kernels agree for a tensor
    tau, shape and values."""
    x = _x((4, 2, 3), torch.float64, "cpu", seed=5)
    tau = _tau_of_shape((2, 3), seed=6)
    s64, v64 = spikecore.lif_multi_step(x, tau=tau, v_threshold=V_TH)
    s32, v32 = spikecore.lif_multi_step(x.float(), tau=tau, v_threshold=V_TH, backend="cpu")
    assert s64.shape == s32.shape == x.shape
    torch.testing.assert_close(s64, s32.double(), rtol=0, atol=0)
    torch.testing.assert_close(v64, v32.double(), rtol=0, atol=0)
    assert math.isfinite(float(v64.sum()))
