"""Triton kernel: tiled ``A^T B`` with the running top-k of every column of B kept in registers.

One program owns ``BLOCK_V`` columns of B. It walks A's columns in tiles of ``BLOCK_U``; each tile's
similarities come from ``tl.dot`` over the samples in chunks of ``BLOCK_N`` on the raw inputs, centred and
scaled afterwards with per-column statistics (``sum_n (a - ma)(b - mb) = sum_n a b - N ma mb``), so
neither input is copied and the ``[U, V]`` matrix never exists. The tile is then merged into the running
list by K rounds of "take the best of (running, tile), ties to the smaller index; remove it".
"""

import torch
import triton
import triton.language as tl

from .ops import check_finite
from .reference import column_stats


@triton.jit
def _topk_sim_kernel(
    a_ptr, b_ptr, ma_ptr, ia_ptr, mb_ptr, ib_ptr, out_v_ptr, out_i_ptr,
    N, U, V, stride_an, stride_bn,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < V
    mb = tl.load(mb_ptr + offs_v, mask=v_ok, other=0.0)
    ib = tl.load(ib_ptr + offs_v, mask=v_ok, other=0.0)
    slot = tl.arange(0, K_PAD)[:, None]
    run_v = tl.full((K_PAD, BLOCK_V), float("-inf"), tl.float32)
    run_i = tl.full((K_PAD, BLOCK_V), -1, tl.int64)
    big = 9223372036854775807
    for u0 in range(0, U, BLOCK_U):
        offs_u = u0 + tl.arange(0, BLOCK_U)
        u_ok = offs_u < U
        acc = tl.zeros((BLOCK_U, BLOCK_V), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            a_tile = a_ptr + offs_n[None, :] * stride_an + offs_u[:, None]  # A^T: [BLOCK_U, BLOCK_N]
            at = tl.load(a_tile, mask=u_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            b_tile = b_ptr + offs_n[:, None] * stride_bn + offs_v[None, :]  # [BLOCK_N, BLOCK_V]
            bt = tl.load(b_tile, mask=n_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(at, bt, input_precision="ieee")
        ma = tl.load(ma_ptr + offs_u, mask=u_ok, other=0.0)
        ia = tl.load(ia_ptr + offs_u, mask=u_ok, other=0.0)
        sim = (acc - N * ma[:, None] * mb[None, :]) * ia[:, None] * ib[None, :]
        # constant or padded rows never win
        sim = tl.where((ia > 0)[:, None] & u_ok[:, None], sim, float("-inf"))
        tile_i = tl.broadcast_to(offs_u[:, None].to(tl.int64), (BLOCK_U, BLOCK_V))
        new_v = tl.full((K_PAD, BLOCK_V), float("-inf"), tl.float32)
        new_i = tl.full((K_PAD, BLOCK_V), -1, tl.int64)
        for j in tl.static_range(K):
            best = tl.maximum(tl.max(run_v, axis=0), tl.max(sim, axis=0))
            pick = tl.minimum(
                tl.min(tl.where((run_v == best[None, :]) & (run_i >= 0), run_i, big), axis=0),
                tl.min(tl.where(sim == best[None, :], tile_i, big), axis=0),
            )
            pick = tl.where(best == float("-inf"), -1, pick)
            new_v = tl.where(slot == j, best[None, :], new_v)
            new_i = tl.where(slot == j, pick[None, :], new_i)
            run_v = tl.where(run_i == pick[None, :], float("-inf"), run_v)  # remove the chosen entry
            sim = tl.where(tile_i == pick[None, :], float("-inf"), sim)
        run_v, run_i = new_v, new_i
    none = (run_v == float("-inf")) | (ib == 0)[None, :]
    out = offs_v[None, :] * K + slot
    ok = v_ok[None, :] & (slot < K)
    tl.store(out_v_ptr + out, tl.where(none, 0.0, run_v), mask=ok)
    tl.store(out_i_ptr + out, tl.where(none, -1, run_i), mask=ok)


def topk_similarity_triton(a: torch.Tensor, b: torch.Tensor, k: int, centered: bool, chunk: int = 2048):
    if a.stride(1) != 1:
        a = a.contiguous()
    if b.stride(1) != 1:
        b = b.contiguous()
    N, U = a.shape
    V = b.shape[1]
    ma, ia = (t.float() for t in column_stats(a, centered, chunk))
    mb, ib = (t.float() for t in column_stats(b, centered, chunk))
    check_finite(ma, ia, mb, ib)
    out_v = torch.empty(V, k, dtype=torch.float32, device=a.device)
    out_i = torch.empty(V, k, dtype=torch.int64, device=a.device)
    block_v = 64 if V > 32 else 32
    grid = (triton.cdiv(V, block_v),)
    _topk_sim_kernel[grid](
        a, b, ma, ia, mb, ib, out_v, out_i, N, U, V, a.stride(0), b.stride(0),
        K=k, K_PAD=triton.next_power_of_2(k), BLOCK_N=32, BLOCK_U=64, BLOCK_V=block_v,
    )  # fmt: skip
    return out_v, out_i
