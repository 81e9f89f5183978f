"""Triton backend of the fused multi-step LIF (the equations of reference.py).

One kernel launch for the forward over all T steps, one for the backward, on flattened ``[T, N]`` tensors
(contract in ``ops.py``). Arithmetic is fp32; loads convert to fp32 and spikes / grad x are stored in x's
dtype.

Memory: the forward saves nothing per step. Time is cut into chunks of ``C = _chunk(T)`` steps; the
forward writes the fp32 membrane V at the start of every chunk but the first (``n_saved(T) =
ceil(T / C) - 1`` rows, zero for ``T <= 16``). The backward walks the chunks from last to first: it
starts from the chunk's V (``v_init`` for chunk 0), recomputes the chunk's H in registers from x with the
exact same fp32 operations as the forward (IEEE division, no multiply so no FMA contraction: the
recomputed H is bit-identical), then walks the chunk in reverse. So only x (already saved by autograd,
in its own dtype), ``v_init`` and ``4 * n_saved(T) / T`` bytes per neuron-step of checkpoints are kept.

Under ``TRITON_INTERPRET=1`` (set before import) the same kernels run on CPU tensors, for tests.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

_MAX_CHUNK = 16
_FWD_BLOCK, _FWD_WARPS = 1024, 4
_BWD_BLOCK, _BWD_WARPS = 512, 4

# The interpreter mishandles a scalar bool combined with a vector mask; compiled code keeps `mask & valid`
# (whose constancy lets loads vectorise).
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
_PI = tl.constexpr(3.141592653589793)
_INV_SQRT_PI = tl.constexpr(0.5641895835477563)


def _chunk(T: int) -> int:
    return min(triton.next_power_of_2(max(int(T), 1)), _MAX_CHUNK)


def n_saved(T: int) -> int:
    """Number of fp32 membrane checkpoint rows ``lif_fwd`` saves for a run of T steps."""
    C = _chunk(T)
    return (int(T) + C - 1) // C - 1


@triton.jit
def _row_mask(offs, mask, N, valid):
    if _INTERPRET:
        m = offs < tl.where(valid, N, 0)
    else:
        m = mask & valid
    return m


@triton.jit
def _charge(v, x, tau, vr, DECAY_INPUT: tl.constexpr):
    # Same operation order as the reference loop; div_rn is IEEE division and there is no multiply to
    # be contracted into an FMA, so forward and backward compute bit-identical H.
    if DECAY_INPUT:
        h = v + tl.math.div_rn(x - (v - vr), tau)
    else:
        h = (v - tl.math.div_rn(v - vr, tau)) + x
    return h


@triton.jit
def _fire_reset(h, v_th, v_reset, SOFT: tl.constexpr):
    spike = (h - v_th) >= 0.0
    if SOFT:
        v = tl.where(spike, h - v_th, h)
    else:
        v = tl.where(spike, v_reset, h)
    return spike, v


@triton.jit
def _surrogate(z, a, SURROGATE: tl.constexpr):
    if SURROGATE == 0:  # sigmoid
        s = tl.sigmoid(a * z)
        sg = a * s * (1.0 - s)
    elif SURROGATE == 1:  # atan
        u = (_PI / 2) * a * z
        sg = (a * 0.5) / (1.0 + u * u)
    elif SURROGATE == 2:  # piecewise_quadratic
        sg = tl.maximum(a - a * a * tl.abs(z), 0.0)
    elif SURROGATE == 3:  # piecewise_exp
        sg = (a * 0.5) * tl.exp(-a * tl.abs(z))
    elif SURROGATE == 4:  # soft_sign
        d = 1.0 / a + tl.abs(z)
        sg = 1.0 / (2.0 * a * d * d)
    elif SURROGATE == 5:  # super_spike
        d = 1.0 + tl.abs(z)
        sg = a / (d * d)
    elif SURROGATE == 6:  # erf
        u = a * z
        sg = (a * _INV_SQRT_PI) * tl.exp(-(u * u))
    else:  # rect
        sg = tl.where(tl.abs(z) < a * 0.5, 1.0 / a, 0.0)
    return sg


@triton.jit
def _grad_h(
    gs, carry, h, v_th, v_reset, alpha, SURROGATE: tl.constexpr, SOFT: tl.constexpr, DETACH: tl.constexpr
):
    """dL/dH[t] from dL/dS[t] (gs) and dL/dV[t] (carry): the four reset/detach cases of reference.py."""
    z = h - v_th
    sg = _surrogate(z, alpha, SURROGATE)
    if SOFT:
        if DETACH:
            gh = gs * sg + carry
        else:
            gh = (gs - v_th * carry) * sg + carry
    else:
        not_spike = tl.where(z >= 0.0, 0.0, 1.0)
        if DETACH:
            gh = gs * sg + carry * not_spike
        else:
            gh = (gs + carry * (v_reset - h)) * sg + carry * not_spike
    return gh


@triton.jit
def _lif_fwd_kernel(
    x_ptr,
    v0_ptr,
    tau_ptr,
    s_ptr,
    vf_ptr,
    vseq_ptr,
    saved_ptr,
    N,
    T,
    tau,
    v_th,
    v_reset,
    SOFT: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    STORE_V: tl.constexpr,
    TAU_PER_NEURON: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    v = tl.load(v0_ptr + offs, mask=mask, other=0.0)
    if TAU_PER_NEURON:
        tau_v = tl.load(tau_ptr + offs, mask=mask, other=1.0)
    else:
        tau_v = tau
    if SOFT:
        vr = 0.0
    else:
        vr = v_reset
    # Pointers advance by N each step (64-bit pointer arithmetic: no int32 overflow of t * N).
    xp = x_ptr + offs
    sp = s_ptr + offs
    vsp = vseq_ptr + offs
    ckp = saved_ptr + offs
    for t in range(T):
        if t > 0:
            if t % CHUNK == 0:
                tl.store(ckp, v, mask=mask)
                ckp += N
        x = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        h = _charge(v, x, tau_v, vr, DECAY_INPUT)
        spike, v = _fire_reset(h, v_th, v_reset, SOFT)
        tl.store(sp, tl.where(spike, 1.0, 0.0).to(s_ptr.dtype.element_ty), mask=mask)
        if STORE_V:
            tl.store(vsp, v, mask=mask)
            vsp += N
        xp += N
        sp += N
    tl.store(vf_ptr + offs, v, mask=mask)


@triton.jit
def _lif_bwd_kernel(
    gs_ptr,
    gv_ptr,
    x_ptr,
    v0_ptr,
    tau_ptr,
    saved_ptr,
    gx_ptr,
    gv0_ptr,
    gtau_ptr,
    N,
    T,
    NC,
    tau,
    v_th,
    v_reset,
    alpha,
    SOFT: tl.constexpr,
    DECAY_INPUT: tl.constexpr,
    DETACH: tl.constexpr,
    SURROGATE: tl.constexpr,
    TAU_PER_NEURON: tl.constexpr,
    NEED_GTAU: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    rows = tl.arange(0, CHUNK)[:, None]
    if TAU_PER_NEURON:
        tau_v = tl.load(tau_ptr + offs, mask=mask, other=1.0)
    else:
        tau_v = tau
    if SOFT:
        vr = 0.0
    else:
        vr = v_reset
    decay = 1.0 - 1.0 / tau_v
    carry = tl.load(gv_ptr + offs, mask=mask, other=0.0)
    gtau = tl.zeros([BLOCK], dtype=tl.float32)
    for cc in range(NC):
        c = NC - 1 - cc
        t0 = c * CHUNK
        if c == 0:
            v = tl.load(v0_ptr + offs, mask=mask, other=0.0)
        else:
            v = tl.load(saved_ptr + (c - 1).to(tl.int64) * N + offs, mask=mask, other=0.0)
        # Recompute the chunk's H (and dH/dtau's numerator) in registers, rows selected by constant index.
        row_off = t0.to(tl.int64) * N
        xp = x_ptr + row_off + offs
        Hs = tl.zeros([CHUNK, BLOCK], dtype=tl.float32)
        As = tl.zeros([CHUNK, BLOCK], dtype=tl.float32)
        for i in tl.static_range(CHUNK):
            m = _row_mask(offs, mask, N, (t0 + i) < T)
            x = tl.load(xp, mask=m, other=0.0).to(tl.float32)
            h = _charge(v, x, tau_v, vr, DECAY_INPUT)
            Hs = tl.where(rows == i, h[None, :], Hs)
            if NEED_GTAU:
                if DECAY_INPUT:
                    num = -(x - (v - vr))
                else:
                    num = v - vr
                As = tl.where(rows == i, num[None, :], As)
            _spike, v = _fire_reset(h, v_th, v_reset, SOFT)
            xp += N
        # Walk the chunk in reverse (rows past T are masked and leave the carry untouched).
        last_off = row_off + (CHUNK - 1) * N
        gsp = gs_ptr + last_off + offs
        gxp = gx_ptr + last_off + offs
        for j in tl.static_range(CHUNK):
            i = CHUNK - 1 - j
            valid = (t0 + i) < T
            m = _row_mask(offs, mask, N, valid)
            h = tl.sum(tl.where(rows == i, Hs, 0.0), axis=0)
            gs = tl.load(gsp, mask=m, other=0.0).to(tl.float32)
            gh = _grad_h(gs, carry, h, v_th, v_reset, alpha, SURROGATE, SOFT, DETACH)
            if DECAY_INPUT:
                gx = gh / tau_v
            else:
                gx = gh
            tl.store(gxp, gx.to(gx_ptr.dtype.element_ty), mask=m)
            if NEED_GTAU:
                num = tl.sum(tl.where(rows == i, As, 0.0), axis=0)
                gtau += tl.where(valid, gh * (num / (tau_v * tau_v)), 0.0)
            carry = tl.where(valid, gh * decay, carry)
            gsp -= N
            gxp -= N
    tl.store(gv0_ptr + offs, carry, mask=mask)
    if NEED_GTAU:
        tl.store(gtau_ptr + offs, gtau, mask=mask)


def _device_ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _zeros_if_none(t, x):
    return x.new_zeros((x.shape[1],), dtype=torch.float32) if t is None else t


def lif_fwd(x, v_init, tau_t, tau, v_th, v_reset, soft, decay_input, store_v_seq):
    T, N = x.shape
    x = x.contiguous()
    v_init = _zeros_if_none(v_init, x).float().contiguous()
    spikes = torch.empty_like(x)
    v_final = torch.empty((N,), dtype=torch.float32, device=x.device)
    v_seq = torch.empty((T, N) if store_v_seq else (0,), dtype=torch.float32, device=x.device)
    saved = torch.empty((n_saved(T), N), dtype=torch.float32, device=x.device)
    if N == 0:
        return spikes, v_final, v_seq, saved
    per_neuron = tau_t is not None
    tau_arg = tau_t.float().contiguous() if per_neuron else v_init  # dummy pointer when unused
    grid = (triton.cdiv(N, _FWD_BLOCK),)
    with _device_ctx(x):
        _lif_fwd_kernel[grid](
            x,
            v_init,
            tau_arg,
            spikes,
            v_final,
            v_seq if store_v_seq else v_final,
            saved,
            N,
            T,
            float(tau),
            float(v_th),
            float(v_reset),
            SOFT=bool(soft),
            DECAY_INPUT=bool(decay_input),
            STORE_V=bool(store_v_seq),
            TAU_PER_NEURON=per_neuron,
            CHUNK=_chunk(T),
            BLOCK=_FWD_BLOCK,
            num_warps=_FWD_WARPS,
        )
    return spikes, v_final, v_seq, saved


def lif_bwd(
    grad_s,
    grad_v,
    x,
    v_init,
    tau_t,
    saved,
    tau,
    v_th,
    v_reset,
    soft,
    decay_input,
    detach_reset,
    surrogate_id,
    alpha,
    need_grad_tau,
):
    T, N = x.shape
    x = x.contiguous()
    has_v_init = v_init is not None
    grad_s = grad_s.to(x.dtype).contiguous()
    grad_v = _zeros_if_none(grad_v, x).float().contiguous()
    v_init = _zeros_if_none(v_init, x).float().contiguous()
    saved = saved.contiguous()
    per_neuron = tau_t is not None
    need_grad_tau = bool(need_grad_tau) and per_neuron
    grad_x = torch.empty_like(x)
    grad_v_init = torch.empty((N,), dtype=torch.float32, device=x.device)  # the kernel writes N floats
    returned_grad_v_init = grad_v_init if has_v_init else grad_v_init[:0]  # [0] without a v_init
    grad_tau = torch.empty((N,) if need_grad_tau else (0,), dtype=torch.float32, device=x.device)
    if N == 0:
        return grad_x, returned_grad_v_init, grad_tau
    C = _chunk(T)
    tau_arg = tau_t.float().contiguous() if per_neuron else v_init
    grid = (triton.cdiv(N, _BWD_BLOCK),)
    with _device_ctx(x):
        _lif_bwd_kernel[grid](
            grad_s,
            grad_v,
            x,
            v_init,
            tau_arg,
            saved if saved.numel() else v_init,
            grad_x,
            grad_v_init,
            grad_tau if need_grad_tau else grad_v_init,
            N,
            T,
            triton.cdiv(T, C),
            float(tau),
            float(v_th),
            float(v_reset),
            float(alpha),
            SOFT=bool(soft),
            DECAY_INPUT=bool(decay_input),
            DETACH=bool(detach_reset),
            SURROGATE=int(surrogate_id),
            TAU_PER_NEURON=per_neuron,
            NEED_GTAU=need_grad_tau,
            CHUNK=C,
            BLOCK=_BWD_BLOCK,
            num_warps=_BWD_WARPS,
        )
    return grad_x, returned_grad_v_init, grad_tau
