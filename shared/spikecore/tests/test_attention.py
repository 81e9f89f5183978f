"""Spiking attention primitives: functional cores against naive formulas, modules against spikingjelly."""

import pytest
import spikingjelly.activation_based.functional as sj_functional
import spikingjelly.activation_based.layer.attention as sj_attention
import torch

import spikecore.attention as A
from spikecore.attention import functional as AF
from spikecore.neuron.module import reset

# The reference loop, and whatever `auto` picks on this machine (the C++ kernels on a CPU, or their numba
# fallback).
BACKENDS = ["torch", "auto"]


# ---------------------------------------------------------------------------------------------------------
# An independent naive LIF (tau 2, hard reset 0, detach_reset, sigmoid(4) surrogate) and naive attention.
class _SigmoidHeaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(4.0 * x)
        return g * 4.0 * s * (1 - s)


def naive_lif(x, v_th=0.5, tau=2.0):
    v = torch.zeros_like(x[0])
    out = []
    for t in range(x.shape[0]):
        h = v + (x[t] - v) / tau
        s = _SigmoidHeaviside.apply(h - v_th)
        v = h * (1 - s.detach())
        out.append(s)
    return torch.stack(out)


def naive_ssa(q, k, v, heads, scale):
    C = q.shape[2]
    d = C // heads
    y = torch.empty_like(q)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        attn = torch.einsum("tbci,tbcj->tbij", q[:, :, sl], k[:, :, sl])  # token i of Q vs token j of K
        y[:, :, sl] = torch.einsum("tbij,tbcj->tbci", attn, v[:, :, sl]) * scale
    return naive_lif(y)


def naive_sdsa(q, k, v):
    kv = torch.einsum("tbcn,tbcn->tbc", k, v)
    return q * naive_lif(kv)[..., None]


def naive_qkta(q, k, heads):
    C = q.shape[2]
    d = C // heads
    ys = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        a = naive_lif(q[:, :, sl].sum(2))  # [T, B, N]
        ys.append(a[:, :, None] * k[:, :, sl])
    return torch.cat(ys, dim=2)


def naive_qkca(q, k):
    return naive_lif(q.sum(3))[..., None] * k


def naive_ff_lidiff(q, k, heads):
    C = q.shape[2]
    d = C // heads
    ys = []
    for h in range(heads):
        first = q[:, :, h * d : h * d + d // 2].sum(2)
        second = q[:, :, h * d + d // 2 : (h + 1) * d].sum(2)
        a = naive_lif(first - second)
        ys.append(a[:, :, None] * k[:, :, h * d : (h + 1) * d])
    return torch.cat(ys, dim=2)


def spikes(*shape, p=0.5, dtype=torch.float64, gen=None):
    return (torch.rand(*shape, generator=gen, dtype=torch.float64) < p).to(dtype)


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    shape = (4, 2, 16, 12)  # T, B, C, N
    return spikes(*shape, gen=g), spikes(*shape, gen=g), spikes(*shape, gen=g, p=0.3)


def _firing_is_mixed(y):
    rate = (y != 0).double().mean().item()
    assert 0.02 < rate < 0.98, f"test input does not exercise the threshold (rate {rate})"


# ---------------------------------------------------------------------------------------------------------
# Functional cores against the naive formulas (float64, forward exact, gradients through the surrogate).
CASES = {
    "ssa_qk": (
        lambda q, k, v, be: AF.ssa(q, k, v, 4, 0.125, "qk_first", backend=be),
        lambda q, k, v: naive_ssa(q, k, v, 4, 0.125),
    ),
    "ssa_kv": (
        lambda q, k, v, be: AF.ssa(q, k, v, 4, 0.125, "kv_first", backend=be),
        lambda q, k, v: naive_ssa(q, k, v, 4, 0.125),
    ),
    "fb_lidiff": (
        lambda q, k, v, be: AF.fb_lidiff(q, k, v, 2, 0.25, backend=be),
        lambda q, k, v: naive_ssa(q, k, v, 2, 0.25),
    ),
    "sdsa": (lambda q, k, v, be: AF.sdsa(q, k, v, 4, backend=be), lambda q, k, v: naive_sdsa(q, k, v)),
    "qkta": (lambda q, k, v, be: AF.qkta(q, k, 4, backend=be), lambda q, k, v: naive_qkta(q, k, 4)),
    "qkca": (lambda q, k, v, be: AF.qkca(q, k, backend=be), lambda q, k, v: naive_qkca(q, k)),
    "ff_lidiff": (
        lambda q, k, v, be: AF.ff_lidiff(q, k, 2, backend=be),
        lambda q, k, v: naive_ff_lidiff(q, k, 2),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_functional_matches_naive_forward_and_grad(name, qkv):
    fn, ref = CASES[name]
    if name == "qkca":  # a sum over 12 tokens at density 0.5 always fires: thin Q out
        qkv = (
            qkv[0] * (torch.rand(qkv[0].shape, generator=torch.Generator().manual_seed(9)) < 0.1),
            *qkv[1:],
        )
    q, k, v = (t.clone().requires_grad_(True) for t in qkv)
    y = fn(q, k, v, "torch")
    assert y.shape == q.shape and y.dtype == q.dtype
    if name != "sdsa":  # SDSA's output is Q * KV: check the KV mask instead
        _firing_is_mixed(y if name.startswith(("ssa", "fb")) else (y != 0) | (qkv[1] == 0))
    q2, k2, v2 = (t.clone().requires_grad_(True) for t in qkv)
    y_ref = ref(q2, k2, v2)
    assert torch.equal(y, y_ref)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        if b.grad is None:
            assert a.grad is None or not a.grad.any()
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
            assert torch.isfinite(a.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_functional_float32_backends(name, backend, qkv):
    fn, ref = CASES[name]
    q, k, v = (t.float() for t in qkv)
    assert torch.equal(fn(q, k, v, backend).double(), ref(*qkv))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [0.125, 0.25, 0.1])
def test_ssa_orders_agree_exactly_on_spikes(dtype, scale):
    g = torch.Generator().manual_seed(1)
    shape = (3, 2, 24, 10)  # d = 8, N = 10: counts <= 80, exact even in bfloat16
    q, k, v = (spikes(*shape, gen=g, dtype=dtype) for _ in range(3))
    # The pre-LIF maps are integer counts times the scale: identical in both orders.
    ident = lambda x: x  # noqa: E731
    pre_qk = AF.ssa(q, k, v, 3, scale, "qk_first", neuron=ident)
    pre_kv = AF.ssa(q, k, v, 3, scale, "kv_first", neuron=ident)
    assert torch.equal(pre_qk, pre_kv)
    counts = AF.ssa(q, k, v, 3, 1.0, "kv_first", neuron=ident)
    assert torch.equal(counts, torch.round(counts)) and torch.equal(pre_kv, counts * scale)
    y_qk = AF.ssa(q, k, v, 3, scale, "qk_first", backend="torch")
    assert torch.equal(y_qk, AF.ssa(q, k, v, 3, scale, "kv_first", backend="torch"))
    assert torch.equal(y_qk, AF.ssa(q, k, v, 3, scale, "auto", backend="torch"))


def test_ff_lidiff_inhibition_masks_token():
    # One head, d = 4, T = 1: token 0's first half fires less than its second half, token 1 the converse.
    q = torch.zeros(1, 1, 4, 3)
    q[0, 0, :, 0] = torch.tensor([1.0, 0, 1, 1])  # 1 - 2 = -1 -> masked
    q[0, 0, :, 1] = torch.tensor([1.0, 1, 0, 1])  # 2 - 1 = 1 -> H = 0.5 >= 0.5 -> passes
    q[0, 0, :, 2] = torch.tensor([1.0, 1, 1, 1])  # 2 - 2 = 0 -> masked (balanced halves inhibit)
    k = torch.ones(1, 1, 4, 3)
    y = AF.ff_lidiff(q, k, 1, backend="torch")
    assert torch.equal(y[0, 0].sum(0), torch.tensor([0.0, 4.0, 0.0]))
    # The same tokens all pass plain token attention (no inhibition).
    assert torch.equal(AF.qkta(q, k, 1, backend="torch")[0, 0].sum(0), torch.tensor([4.0, 4.0, 4.0]))
    # Two heads: the mask is per head.
    q2 = torch.cat([q, q.flip(2)], dim=2)  # head 1 has its halves swapped
    y2 = AF.ff_lidiff(q2, torch.ones(1, 1, 8, 3), 2, backend="torch")
    assert torch.equal(y2[0, 0, :4].sum(0), torch.tensor([0.0, 4.0, 0.0]))
    assert torch.equal(y2[0, 0, 4:].sum(0), torch.tensor([4.0, 0.0, 0.0]))


def test_functional_errors():
    x = torch.zeros(2, 1, 6, 4)
    with pytest.raises(ValueError, match="divisible"):
        AF.qkta(x, x, 4)
    with pytest.raises(ValueError, match="even"):
        AF.ff_lidiff(x, x, 2)  # d = 3
    with pytest.raises(ValueError, match="order"):
        AF.ssa(x, x, x, 2, order="bad")
    with pytest.raises(ValueError, match="shape"):
        AF.sdsa(x, x[..., :2], x, 2)


# ---------------------------------------------------------------------------------------------------------
# Modules.
MODULES = [
    A.SpikingSelfAttention,
    A.SpikeDrivenSelfAttention,
    A.TokenQKAttention,
    A.ChannelQKAttention,
    A.FFLiDiffAttention,
    A.FBLiDiffAttention,
]


def _input(shape=(4, 2, 16, 12), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("cls", MODULES)
def test_module_shapes_and_gradients(cls):
    torch.manual_seed(0)
    m = cls(16, 4, backend="torch")
    x = _input().requires_grad_(True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # [T, B, C, H, W] input is flattened to tokens and restored.
    assert m(x.detach().reshape(4, 2, 16, 3, 4)).shape == (4, 2, 16, 3, 4)


@pytest.mark.parametrize("cls", MODULES)
def test_module_param_count(cls):
    C = 16
    m = cls(C, 4)
    n_branches = 2 if cls in (A.TokenQKAttention, A.ChannelQKAttention, A.FFLiDiffAttention) else 3
    expected = n_branches * (C * C + 2 * C) + (C * C + C) + 2 * C
    assert sum(p.numel() for p in m.parameters()) == expected


def test_fb_lidiff_zero_feedback_equals_ssa_linear():
    torch.manual_seed(0)
    fb = A.FBLiDiffAttention(16, 2, scale=0.5, backend="torch").double()
    for bn in (fb.q_bn, fb.k_bn, fb.v_bn, fb.proj_bn):
        bn.bias.data.fill_(1.0)  # default BN init keeps Q/K/V at ~3% firing: raise it to exercise the LIFs
    ssa = A.SpikingSelfAttention(16, 2, scale=0.5, order="kv_first", backend="torch").double()
    ssa.load_state_dict(fb.state_dict())
    x = _input(dtype=torch.float64)
    y = ssa(x)
    _firing_is_mixed(y)
    _firing_is_mixed(ssa.attend(*(ssa.project(n, x) for n in "qkv")))
    assert torch.equal(fb(x), y)
    assert torch.equal(fb(x, feedback=torch.zeros_like(x)), y)
    f = _input(seed=3, dtype=torch.float64)
    y_f = fb(x, feedback=f)
    assert not torch.equal(y_f, y)
    # Feedback goes through the same W_v, added before BN: V_pre = W_v X + W_v F.
    v_extra = fb.v_conv(f.flatten(0, 1)).reshape(f.shape)
    assert torch.equal(y_f, ssa(x, v_extra=v_extra))


def test_extra_inputs_enter_before_bn():
    torch.manual_seed(0)
    m = A.TokenQKAttention(16, 4, backend="torch").double().eval()
    x = _input(dtype=torch.float64)
    e = _input(seed=5, dtype=torch.float64)
    seen = {}
    m.k_bn.register_forward_hook(lambda mod, inp, out: seen.__setitem__("k_bn_in", inp[0]))
    m(x, k_extra=e)
    expected = m.k_conv(x.flatten(0, 1)) + e.flatten(0, 1)
    torch.testing.assert_close(seen["k_bn_in"], expected)
    with pytest.raises(ValueError, match="v_extra"):
        m(x, v_extra=e)


@pytest.mark.parametrize("cls", MODULES)
def test_stateful_segments_equal_full_run(cls):
    # TDFormer runs T steps as segments with neuron state carried: every op here is per time step, so
    # with BN in eval mode two segments of T/2 must equal one run of T.
    torch.manual_seed(0)
    m = cls(16, 4, backend="torch", stateful=True).double().eval()
    x = _input(dtype=torch.float64)
    full = m(x)
    reset(m)
    seg = torch.cat([m(x[:2]), m(x[2:])])
    reset(m)
    assert torch.equal(full, seg)


# ---------------------------------------------------------------------------------------------------------
# Parity with spikingjelly's independent implementations.


def _copy_bn(dst, src, sl=slice(None)):
    dst.weight.data.copy_(src.weight.data[sl])
    dst.bias.data.copy_(src.bias.data[sl])
    dst.running_mean.copy_(src.running_mean[sl])
    dst.running_var.copy_(src.running_var[sl])


def _randomize_bn(bn, gen):
    n = bn.num_features
    bn.weight.data = 1 + 0.3 * torch.randn(n, generator=gen, dtype=bn.weight.dtype)
    bn.bias.data = 1.0 + 0.3 * torch.randn(n, generator=gen, dtype=bn.weight.dtype)  # Q/K/V fire often
    bn.running_mean = 0.5 * torch.randn(n, generator=gen, dtype=bn.weight.dtype)
    bn.running_var = 0.5 + torch.rand(n, generator=gen, dtype=bn.weight.dtype)


def _from_fused(ours, conv_bn, names, C):
    """spikingjelly fuses the projections into one Conv1d(C, k*C) + BN(k*C): slice it per branch."""
    conv, bn = conv_bn[0], conv_bn[1]
    for i, n in enumerate(names):
        sl = slice(i * C, (i + 1) * C)
        getattr(ours, f"{n}_conv").weight.data.copy_(conv.weight.data[sl])
        _copy_bn(getattr(ours, f"{n}_bn"), bn, sl)


def _prepare_proj(ours, sj_proj_conv, sj_proj_bn):
    ours.proj_conv.weight.data.copy_(sj_proj_conv.weight.data.reshape(ours.proj_conv.weight.shape))
    if sj_proj_conv.bias is None:  # spikingjelly's SSA / QKA projections have no bias
        ours.proj_conv.bias.data.zero_()
    else:
        ours.proj_conv.bias.data.copy_(sj_proj_conv.bias.data)
    _copy_bn(ours.proj_bn, sj_proj_bn)


def _compare(ours, sj, x, train):
    ours.train(train)
    sj.train(train)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    sj_functional.reset_net(sj)
    ya, yb = ours(xa), sj(xb)
    assert torch.equal(ya, yb)
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)
    return ya


def _bns(m):
    return [mod for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("order", ["qk_first", "kv_first"])
def test_parity_spikingjelly_ssa(train, order):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    C, H = 32, 4
    sj = sj_attention.SpikingSelfAttention(C, H).double()
    sj.scale = 0.5  # 0.125 leaves the attention LIF silent at these small sizes: a larger scale exercises it
    for bn in _bns(sj):
        _randomize_bn(bn, g)
    ours = A.SpikingSelfAttention(C, H, scale=0.5, order=order, backend="torch").double()
    _from_fused(ours, sj.qkv_conv_bn, "qkv", C)
    _prepare_proj(ours, sj.proj_conv_bn[0], sj.proj_conv_bn[1])
    x = (torch.rand(4, 2, C, 16, generator=g, dtype=torch.float64) < 0.5).double()
    y = _compare(ours, sj, x, train)
    _firing_is_mixed(y)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", ["token", "channel"])
def test_parity_spikingjelly_qk_attention(train, kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    C, H = 32, 4
    sj_cls, our_cls = {
        "token": (sj_attention.TokenQKAttention, A.TokenQKAttention),
        "channel": (sj_attention.ChannelQKAttention, A.ChannelQKAttention),
    }[kind]
    sj = sj_cls(C, H).double()
    for bn in _bns(sj):
        _randomize_bn(bn, g)
    ours = our_cls(C, H, backend="torch").double()
    _from_fused(ours, sj.qk_conv_bn, "qk", C)
    _prepare_proj(ours, sj.proj_conv_bn[0], sj.proj_conv_bn[1])
    x = (torch.rand(4, 2, C, 16, generator=g, dtype=torch.float64) < 0.5).double()
    y = _compare(ours, sj, x, train)
    _firing_is_mixed(y)


@pytest.mark.parametrize("train", [True, False])
def test_parity_spikingjelly_sdsa(train):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    C, H = 32, 4
    sj = sj_attention.SpikeDrivenSelfAttention(C, H).double()
    for bn in _bns(sj):
        _randomize_bn(bn, g)
    ours = A.SpikeDrivenSelfAttention(C, H, backend="torch").double()
    for n in "qkv":
        getattr(ours, f"{n}_conv").weight.data.copy_(getattr(sj, f"{n}_conv").weight.data.reshape(C, C, 1))
        _copy_bn(getattr(ours, f"{n}_bn"), getattr(sj, f"{n}_bn"))
    _prepare_proj(ours, sj.proj_conv, sj.proj_bn)
    # SDT's block input is the real-valued residual stream; spikingjelly takes [T, B, C, H, W].
    x = 3 * torch.rand(4, 2, C, 4, 4, generator=g, dtype=torch.float64)
    y = _compare(ours, sj, x, train)
    assert not torch.equal(y, x)


# ---------------------------------------------------------------------------------------------------------
def test_triton_lif_backend_through_attention(qkv):
    q, k, v = (t.float()[:2, :1] for t in qkv)
    for name in ("ssa_kv", "qkta"):
        fn, ref = CASES[name]
        assert torch.equal(fn(q, k, v, "triton").double(), ref(q.double(), k.double(), v.double()))


@pytest.mark.parametrize("cls", [A.SpikingSelfAttention, A.FFLiDiffAttention, A.SpikeDrivenSelfAttention])
def test_module_auto_backend_matches_torch(cls):
    torch.manual_seed(0)
    ref = cls(16, 2, backend="torch")
    for bn in _bns(ref):
        bn.bias.data.fill_(1.0)
    auto = cls(16, 2, backend="auto")
    auto.load_state_dict(ref.state_dict())
    x = _input()
    xa, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yr = auto(xa), ref(xr)
    assert torch.equal(ya, yr)
    ya.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-4, atol=1e-5)
