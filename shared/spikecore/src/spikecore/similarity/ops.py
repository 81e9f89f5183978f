"""``topk_similarity``: argument checks, the backend choice, and the chunked CPU / PyTorch path."""

import torch

from .reference import column_stats

BACKENDS = ("auto", "torch", "triton")


def _check(a: torch.Tensor, b: torch.Tensor, k: int, chunk: int) -> None:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() != 2 or b.dim() != 2:
        raise ValueError("a and b must be 2-D tensors [N samples, U] and [N samples, V]")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b need the same number of samples (rows), got {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] < 2:
        raise ValueError(f"a similarity needs at least 2 samples, got {a.shape[0]}")
    if not a.is_floating_point() or not b.is_floating_point():
        raise TypeError(f"a and b must be floating point, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


def check_finite(*stats: torch.Tensor) -> None:
    """NaN or inf anywhere in a column makes its mean or norm non-finite: checked on the O(U + V) column
    statistics rather than on a copy of the inputs."""
    if not all(bool(torch.isfinite(s).all()) for s in stats):
        raise ValueError("a and b must be finite (found NaN or inf); drop or impute those samples first")


def topk_similarity(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int = 1,
    centered: bool = True,
    *,
    chunk: int = 2048,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each column v of ``b`` ``[N, V]``, the ``k`` columns u of ``a`` ``[N, U]`` most similar to it.

    Similarity is Pearson r (``centered=True``: cosine of the mean-removed columns) or plain cosine.
    Returns ``(values [V, k] float32, indices [V, k] int64)``, best first; ties go to the smaller u.
    Constant (zero-norm) columns of ``a`` never win; a constant column of ``b``, and slots beyond the
    number of usable columns of ``a``, get value 0 and index -1 (never NaN).

    Memory: the ``[U, V]`` matrix is never formed; the CPU path holds ``chunk x chunk`` similarities and
    ``N x chunk`` normalised columns at a time; the Triton kernel (``backend="triton"``, the default for
    CUDA tensors) keeps its running top-k in registers and reads ``a`` and ``b`` as they are.
    """
    _check(a, b, k, chunk)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if a.is_cuda else "torch"
    if backend == "triton":
        from ._triton import topk_similarity_triton

        return topk_similarity_triton(a, b, k, centered, chunk)
    return _topk_chunked(a, b, k, centered, chunk)


def similarity_tiles(a: torch.Tensor, b: torch.Tensor, stats_a, stats_b, chunk: int = 2048):
    """Walk the ``[U, V]`` similarity matrix of the columns of ``a`` ``[N, U]`` and ``b`` ``[N, V]`` in
    ``chunk x chunk`` tiles, ``v`` blocks outer and ``u`` blocks inner, without ever holding it.

    ``stats_a`` / ``stats_b``: ``(mean, inv_norm)`` from ``column_stats`` (zeros mean plain cosine).
    Yields ``(u0, v0, tile)``, ``tile[i, j]`` the similarity of columns ``u0 + i`` and ``v0 + j`` in
    float32; constant columns give 0. Every tile is a view of one buffer that the next tile overwrites:
    use or copy it before asking for the next. One buffer each for the tile and the normalised columns
    of ``a`` and ``b``: a fresh 16 MB tile per step leaves the peak memory to the allocator (glibc's heap
    held up to six of them).
    """
    N, U, V = a.shape[0], a.shape[1], b.shape[1]
    ma, ia = (t.float() for t in stats_a)
    mb, ib = (t.float() for t in stats_b)
    tile_buf = torch.empty(min(chunk, U) * min(chunk, V), dtype=torch.float32, device=a.device)
    an_buf = torch.empty(N * min(chunk, U), dtype=torch.float32, device=a.device)
    bn_buf = torch.empty(N * min(chunk, V), dtype=torch.float32, device=a.device)
    for v0 in range(0, V, chunk):
        v1 = min(v0 + chunk, V)
        bn = _normalised_into(bn_buf, b[:, v0:v1], mb[v0:v1], ib[v0:v1])
        for u0 in range(0, U, chunk):
            u1 = min(u0 + chunk, U)
            an = _normalised_into(an_buf, a[:, u0:u1], ma[u0:u1], ia[u0:u1])
            yield u0, v0, torch.mm(an.T, bn, out=tile_buf[: (u1 - u0) * (v1 - v0)].view(u1 - u0, v1 - v0))


def _normalised_into(buf: torch.Tensor, x: torch.Tensor, mean32: torch.Tensor, inv32: torch.Tensor):
    """``(x - mean) * inv_norm`` in float32 in the front of the flat ``buf``, as an ``x``-shaped view."""
    out = buf[: x.numel()].view(x.shape)
    return torch.sub(x, mean32, out=out).mul_(inv32)


def _merge(run_v, run_i, tile, u0: int, k: int):
    """Best k of the running list and a new tile ``[cu, cv]`` of rows u0.., ties to the smaller u."""
    if k == 1:
        m, i = tile.max(dim=0)  # the first maximal row on ties
        better = m > run_v[0]  # strictly: on a tie the earlier (smaller) u stays
        return torch.where(better, m, run_v[0])[None], torch.where(better, i + u0, run_i[0])[None]
    kk = min(k, tile.shape[0])
    cand_v, cand_i = tile.topk(kk, dim=0)
    if bool(((tile >= cand_v[-1]).sum(0) > kk).any()):
        # A tie at the k-th place: topk may have kept a larger u than a tied one it left out. Rare;
        # take every row of the tile then, so that the stable sort below decides.
        cand_v = tile
        cand_i = torch.arange(tile.shape[0], device=tile.device)[:, None].expand_as(tile)
    else:  # the k candidates in u order, so that equal values stay in u order through the stable sort
        cand_i, order = cand_i.sort(dim=0)
        cand_v = cand_v.gather(0, order)
    vals = torch.cat([run_v, cand_v])
    idx = torch.cat([run_i, cand_i + u0])
    # Running entries precede the candidates and have smaller u, ties inside each part are in u order: a
    # stable descending sort therefore breaks every tie towards the smaller u.
    order = torch.sort(vals, dim=0, descending=True, stable=True).indices[:k]
    return vals.gather(0, order), idx.gather(0, order)


def _topk_chunked(a, b, k, centered, chunk):
    V = b.shape[1]
    ma, ia = column_stats(a, centered, chunk)
    mb, ib = column_stats(b, centered, chunk)
    check_finite(ma, ia, mb, ib)
    run_v = torch.full((k, V), float("-inf"), device=a.device)
    run_i = torch.full((k, V), -1, dtype=torch.int64, device=a.device)
    for u0, v0, tile in similarity_tiles(a, b, (ma, ia), (mb, ib), chunk):
        v1 = v0 + tile.shape[1]
        tile[ia[u0 : u0 + tile.shape[0]] == 0] = float("-inf")  # constant columns of a never win
        run_v[:, v0:v1], run_i[:, v0:v1] = _merge(run_v[:, v0:v1], run_i[:, v0:v1], tile, u0, k)
    none = torch.isinf(run_v) | (ib == 0)[None]
    out_v = torch.where(none, torch.zeros_like(run_v), run_v).T.contiguous()
    out_i = torch.where(none, torch.full_like(run_i, -1), run_i).T.contiguous()
    return out_v, out_i
