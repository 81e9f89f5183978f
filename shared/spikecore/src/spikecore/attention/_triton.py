"""Fused SDSA core : the KV accumulation fused with the attention LIF, in Triton.

SDSA (Spike-driven Transformer v1) on tokens-last ``q, k, v`` ``[T, B, C, N]``::

    kv[t, b, c]   = sum_n k[t, b, c, n] * v[t, b, c, n]
    a[:, b, c]    = LIF(kv[:, b, c])                 (multi-step over t, v_init = 0, decay_input=True)
    y[t, b, c, n] = q[t, b, c, n] * a[t, b, c]

The PyTorch path writes the full-size ``k * v`` and reads it back. Here one program owns ``BLOCK_C``
channels of one batch row ``b`` and walks t:

* **forward** (one launch): for each t, reduce ``k * v`` over n in ``BLOCK_N`` tiles (fp32 accumulator),
  charge / fire / reset in registers, store the fp32 membrane ``H[t, b, c]`` (the only thing saved,
  ``[T, B, C]``: 4 bytes per channel-step, ``1 / N`` of one input), then write ``y = q * a`` tile by tile.
  Bytes: read q, k, v once, write y.
* **backward** (one launch): pass 1 forward in t: ``a`` from the saved H, ``gq = gy * a`` and
  ``ga[t] = sum_n gy * q`` (written to a ``[T, B, C]`` fp32 scratch); pass 2 backward in t: the LIF
  backward recurrence (neuron/reference.py) with the surrogate (carry in registers, ``gkv = gH / tau``), then
  ``gk = gkv * v``, ``gv = gkv * k`` tile by tile. Bytes: read gy, q, k, v once, write gq, gk, gv.

The LIF arithmetic is the fused LIF's own (``spikecore.neuron._triton``: exact ``div_rn`` charge, the
same fire / reset and surrogate helpers), so on spike inputs (integer counts, exact in fp32) the forward is
bit-identical to ``sdsa(backend="torch")``. Inputs fp32 / fp16 / bf16 (loads convert to fp32), outputs in
the input dtype. Under ``TRITON_INTERPRET=1`` (set before import) the kernels run on CPU tensors.
"""

import torch
import triton
import triton.language as tl

from ..neuron._triton import _charge, _device_ctx, _fire_reset, _grad_h

# Tile: BLOCK_N tokens (a power of two up to _MAX_BLOCK_N) x BLOCK_C channels, about _TILE elements.
# Untuned (no GPU was available when this was written); _MAX_BLOCK_N is read at call time so that tests
# can force several n-tiles on tiny shapes.
_MAX_BLOCK_N = 256
_TILE = 2048
_NUM_WARPS = 4
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tiles(C: int, N: int) -> tuple[int, int]:
    block_n = min(triton.next_power_of_2(max(N, 1)), _MAX_BLOCK_N)
    block_c = min(max(_TILE // block_n, 1), triton.next_power_of_2(max(C, 1)))
    return block_c, block_n


@triton.jit
def _sdsa_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    y_ptr,
    h_ptr,
    T,
    C,
    N,
    step,
    hstep,
    tau,
    v_th,
    v_reset,
    SOFT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    arange_n = tl.arange(0, BLOCK_N)
    # Element (t, b, c, n) sits at t * step + (b * C + c) * N + n (step = B * C * N); 64-bit offsets.
    row = (b * C + offs_c).to(tl.int64) * N  # [BLOCK_C], t = 0
    hrow = (b * C + offs_c).to(tl.int64)
    if SOFT:
        vr = 0.0
    else:
        vr = v_reset
    mem = tl.zeros([BLOCK_C], dtype=tl.float32)
    # Offsets advance by one time step per iteration (64-bit: no int32 overflow of t * step).
    base = row
    hoff = hrow
    for _t in range(T):
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + arange_n
            m = cmask[:, None] & (offs_n < N)[None, :]
            idx = base[:, None] + offs_n[None, :]
            kk = tl.load(k_ptr + idx, mask=m, other=0.0).to(tl.float32)
            vv = tl.load(v_ptr + idx, mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(kk * vv, axis=1)
        h = _charge(mem, acc, tau, vr, True)
        spike, mem = _fire_reset(h, v_th, v_reset, SOFT)
        tl.store(h_ptr + hoff, h, mask=cmask)
        a = tl.where(spike, 1.0, 0.0)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + arange_n
            m = cmask[:, None] & (offs_n < N)[None, :]
            idx = base[:, None] + offs_n[None, :]
            qq = tl.load(q_ptr + idx, mask=m, other=0.0).to(tl.float32)
            tl.store(y_ptr + idx, (qq * a[:, None]).to(y_ptr.dtype.element_ty), mask=m)
        base += step
        hoff += hstep


@triton.jit
def _sdsa_bwd_kernel(
    gy_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    h_ptr,
    ga_ptr,
    gq_ptr,
    gk_ptr,
    gv_ptr,
    T,
    C,
    N,
    step,
    hstep,
    last_off,
    last_hoff,
    tau,
    v_th,
    v_reset,
    alpha,
    SOFT: tl.constexpr,
    DETACH: tl.constexpr,
    SURROGATE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    arange_n = tl.arange(0, BLOCK_N)
    row = (b * C + offs_c).to(tl.int64) * N
    hrow = (b * C + offs_c).to(tl.int64)
    # Pass 1 (t forward): gq = gy * a, ga[t] = sum_n gy * q.
    base = row
    hoff = hrow
    for _t in range(T):
        h = tl.load(h_ptr + hoff, mask=cmask, other=0.0)
        a = tl.where((h - v_th) >= 0.0, 1.0, 0.0)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + arange_n
            m = cmask[:, None] & (offs_n < N)[None, :]
            idx = base[:, None] + offs_n[None, :]
            gy = tl.load(gy_ptr + idx, mask=m, other=0.0).to(tl.float32)
            qq = tl.load(q_ptr + idx, mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(gy * qq, axis=1)
            tl.store(gq_ptr + idx, (gy * a[:, None]).to(gq_ptr.dtype.element_ty), mask=m)
        tl.store(ga_ptr + hoff, acc, mask=cmask)
        base += step
        hoff += hstep
    # ga is read back below by possibly other threads of this program.
    tl.debug_barrier()
    # Pass 2 (t backward): LIF backward, carry = dL/dV[t] (0 after the last step: v_final is not returned).
    decay = 1.0 - 1.0 / tau
    carry = tl.zeros([BLOCK_C], dtype=tl.float32)
    base = row + last_off
    hoff = hrow + last_hoff
    for _t in range(T):
        h = tl.load(h_ptr + hoff, mask=cmask, other=0.0)
        gs = tl.load(ga_ptr + hoff, mask=cmask, other=0.0)
        gh = _grad_h(gs, carry, h, v_th, v_reset, alpha, SURROGATE, SOFT, DETACH)
        gkv = gh / tau
        carry = gh * decay
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + arange_n
            m = cmask[:, None] & (offs_n < N)[None, :]
            idx = base[:, None] + offs_n[None, :]
            kk = tl.load(k_ptr + idx, mask=m, other=0.0).to(tl.float32)
            vv = tl.load(v_ptr + idx, mask=m, other=0.0).to(tl.float32)
            tl.store(gk_ptr + idx, (gkv[:, None] * vv).to(gk_ptr.dtype.element_ty), mask=m)
            tl.store(gv_ptr + idx, (gkv[:, None] * kk).to(gv_ptr.dtype.element_ty), mask=m)
        base -= step
        hoff -= hstep


def _grid(B: int, C: int, block_c: int) -> tuple[int, int]:
    return (triton.cdiv(C, block_c), B)


def sdsa_fwd(q, k, v, tau, v_th, v_reset, soft):
    """``(y [T,B,C,N] in q's dtype, H [T,B,C] fp32)``; inputs contiguous, same dtype and device."""
    T, B, C, N = q.shape
    y = torch.empty_like(q)
    h = q.new_empty((T, B, C), dtype=torch.float32)
    if h.numel() == 0:
        return y, h
    block_c, block_n = _tiles(C, N)
    with _device_ctx(q):
        _sdsa_fwd_kernel[_grid(B, C, block_c)](
            q,
            k,
            v,
            y,
            h,
            T,
            C,
            N,
            B * C * N,
            B * C,
            float(tau),
            float(v_th),
            float(v_reset),
            SOFT=bool(soft),
            BLOCK_C=block_c,
            BLOCK_N=block_n,
            num_warps=_NUM_WARPS,
        )
    return y, h


def sdsa_bwd(gy, q, k, v, h, tau, v_th, v_reset, soft, detach_reset, surrogate_id, alpha):
    """``(gq, gk, gv)`` in the inputs' dtype, from ``gy`` and the saved fp32 membrane ``h``."""
    T, B, C, N = q.shape
    gq, gk, gv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return gq, gk, gv
    ga = torch.empty_like(h)  # [T, B, C] fp32 scratch: dL/da
    block_c, block_n = _tiles(C, N)
    with _device_ctx(q):
        _sdsa_bwd_kernel[_grid(B, C, block_c)](
            gy,
            q,
            k,
            v,
            h,
            ga,
            gq,
            gk,
            gv,
            T,
            C,
            N,
            B * C * N,
            B * C,
            (T - 1) * B * C * N,
            (T - 1) * B * C,
            float(tau),
            float(v_th),
            float(v_reset),
            float(alpha),
            SOFT=bool(soft),
            DETACH=bool(detach_reset),
            SURROGATE=int(surrogate_id),
            BLOCK_C=block_c,
            BLOCK_N=block_n,
            num_warps=_NUM_WARPS,
        )
    return gq, gk, gv


# --------------------------------------------------------------------------------- torch.library plumbing
@torch.library.custom_op("spikecore::sdsa_fused_fwd", mutates_args=())
def _sdsa_fused_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tau: float,
    v_th: float,
    v_reset: float,
    soft: bool,
    detach_reset: bool,
    surrogate_id: int,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    # detach_reset, surrogate_id and alpha only shape the backward; they are inputs so that the autograd
    # context gets them without state outside the op.
    return sdsa_fwd(q, k, v, tau, v_th, v_reset, soft)


@_sdsa_fused_fwd.register_fake
def _sdsa_fused_fwd_fake(q, k, v, tau, v_th, v_reset, soft, detach_reset, surrogate_id, alpha):
    T, B, C, _N = q.shape
    return torch.empty_like(q), q.new_empty((T, B, C), dtype=torch.float32)


@torch.library.custom_op("spikecore::sdsa_fused_bwd", mutates_args=())
def _sdsa_fused_bwd(
    gy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    tau: float,
    v_th: float,
    v_reset: float,
    soft: bool,
    detach_reset: bool,
    surrogate_id: int,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sdsa_bwd(gy, q, k, v, h, tau, v_th, v_reset, soft, detach_reset, surrogate_id, alpha)


@_sdsa_fused_bwd.register_fake
def _sdsa_fused_bwd_fake(gy, q, k, v, h, tau, v_th, v_reset, soft, detach_reset, surrogate_id, alpha):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *params = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.params = tuple(params)  # tau, v_th, v_reset, soft, detach_reset, surrogate_id, alpha


def _backward(ctx, gy, _gh):
    q, k, v, h = ctx.saved_tensors
    gy = torch.zeros_like(q) if gy is None else gy.to(q.dtype).contiguous()
    gq, gk, gv = _sdsa_fused_bwd(gy, q, k, v, h, *ctx.params)
    return gq, gk, gv, *([None] * 7)


_sdsa_fused_fwd.register_autograd(_backward, setup_context=_setup_context)


def sdsa_fused(q, k, v, *, tau, v_threshold, v_reset, detach_reset, surrogate_id, alpha) -> torch.Tensor:
    """Fused SDSA core ``q * LIF(sum_n k * v)`` (``v_reset=None``: soft reset). Returns ``y`` only."""
    soft = v_reset is None
    y, _h = _sdsa_fused_fwd(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        float(tau),
        float(v_threshold),
        0.0 if soft else float(v_reset),
        soft,
        bool(detach_reset),
        int(surrogate_id),
        float(alpha),
    )
    return y
