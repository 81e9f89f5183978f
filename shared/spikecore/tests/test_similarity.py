"""Streaming top-k similarity against the float64 full-matrix oracle, on every backend."""

import pytest
import torch
from spikecore_testing import requires_cuda

from spikecore.similarity import column_stats, similarity_tiles, topk_similarity, topk_similarity_reference

BACKENDS = ["torch", "triton"]  # triton runs under TRITON_INTERPRET=1 without a GPU (conftest)


def _data(n, u, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, u, generator=g) * torch.rand(u, generator=g) * 3 + torch.randn(u, generator=g)
    b = a[:, torch.randint(0, u, (v,), generator=g)] * 0.7 + torch.randn(n, v, generator=g)  # real matches
    return a, b


def _naive_pearson(a, b):
    """Pearson r by its textbook formula, one pair at a time (independent of the oracle's code)."""
    out = torch.empty(a.shape[1], b.shape[1], dtype=torch.float64)
    for i in range(a.shape[1]):
        for j in range(b.shape[1]):
            x, y = a[:, i].double(), b[:, j].double()
            x, y = x - x.mean(), y - y.mean()
            out[i, j] = (x * y).sum() / (x.norm() * y.norm())
    return out


def test_reference_is_pearson_r():
    a, b = _data(20, 7, 5)
    vals, idx = topk_similarity_reference(a, b, k=3)
    r = _naive_pearson(a, b)
    best = r.sort(dim=0, descending=True)
    torch.testing.assert_close(vals, best.values[:3].T.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(idx, best.indices[:3].T)


@pytest.mark.parametrize("centered", [True, False])
def test_tiles_cover_the_matrix_in_one_reused_buffer(centered):
    a, b = _data(37, 50, 23, seed=3)
    a[:, 4] = 2.5  # constant: no Pearson r (0 in the tiles), a plain cosine all the same
    full = torch.full((50, 23), float("nan"), dtype=torch.float64)
    storages = set()
    stats_a, stats_b = column_stats(a, centered), column_stats(b, centered)
    for u0, v0, tile in similarity_tiles(a, b, stats_a, stats_b, chunk=16):
        assert full[u0 : u0 + tile.shape[0], v0 : v0 + tile.shape[1]].isnan().all()  # each cell once
        full[u0 : u0 + tile.shape[0], v0 : v0 + tile.shape[1]] = tile.double()
        storages.add(tile.untyped_storage().data_ptr())
    if centered:
        want = _naive_pearson(a, b)
        want[4] = 0.0
    else:
        an, bn = a.double() / a.double().norm(dim=0), b.double() / b.double().norm(dim=0)
        want = an.T @ bn
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-6)
    assert len(storages) == 1  # every tile overwrote the one buffer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("shape", [(37, 50, 23), (5, 130, 70)])
def test_matches_the_oracle(backend, k, centered, shape):
    a, b = _data(*shape)
    vals, idx = topk_similarity(a, b, k=k, centered=centered, chunk=16, backend=backend)
    ref_v, ref_i = topk_similarity_reference(a, b, k=k, centered=centered)
    torch.testing.assert_close(vals, ref_v, rtol=1e-4, atol=1e-5)
    # Indices equal wherever the oracle's values are not within rounding of each other.
    ref_full = topk_similarity_reference(a, b, k=k + 1, centered=centered)[0]
    clear = (ref_full[:, :k] - ref_full[:, 1 : k + 1]).abs() > 1e-5
    assert torch.equal(idx[clear], ref_i[clear])
    assert vals.dtype == torch.float32 and idx.dtype == torch.int64 and vals.shape == (shape[2], k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_columns_never_win_and_never_give_nan(backend):
    a, b = _data(12, 9, 6)
    a[:, 2] = 5.0  # constant: no Pearson r
    a[:, 4] = b[:, 0] * 10  # the perfect match of b's first column
    b[:, 3] = -1.0  # constant voxel
    vals, idx = topk_similarity(a, b, k=2, chunk=4, backend=backend)
    assert not torch.isnan(vals).any()
    assert (idx != 2).all()
    assert idx[0, 0] == 4 and vals[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert (idx[3] == -1).all() and (vals[3] == 0).all()
    few_v, few_i = topk_similarity(a[:, :3], b, k=3, chunk=4, backend=backend)  # only 2 usable columns
    assert (few_i[:, 2] == -1).all() and (few_v[:, 2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("k", "chunk"), [(3, 2), (3, 8), (2, 8), (2, 4)])
def test_ties_go_to_the_smaller_index(backend, k, chunk):
    g = torch.Generator().manual_seed(3)
    col = torch.randn(10, 1, generator=g)
    a = torch.cat([torch.randn(10, 3, generator=g), col, torch.randn(10, 2, generator=g), col, col], 1)
    b = col.repeat(1, 3)
    vals, idx = topk_similarity(a, b, k=k, chunk=chunk, backend=backend)
    # three exact ties (identical columns): kept in index order, within a chunk and across chunks
    assert idx.tolist() == [[3, 6, 7][:k]] * 3
    torch.testing.assert_close(vals, torch.ones(3, k), rtol=0, atol=1e-5)


def test_chunking_does_not_change_the_result():
    a, b = _data(30, 100, 40, seed=5)
    whole = topk_similarity(a, b, k=4, chunk=1000)
    for chunk in (1, 7, 33):
        part = topk_similarity(a, b, k=4, chunk=chunk)
        torch.testing.assert_close(part[0], whole[0], rtol=1e-5, atol=1e-6)
        assert torch.equal(part[1], whole[1])


def test_memory_stays_chunk_sized():
    """The largest tensor the CPU path makes is chunk x chunk or N x chunk, never U x V."""
    a, b = _data(8, 600, 500, seed=2)
    biggest = 0

    class Track(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            nonlocal biggest
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    biggest = max(biggest, t.numel())
            return out

    with Track():
        topk_similarity(a, b, k=2, chunk=50)
    chunk, k, n, u, v = 50, 2, 8, 600, 500
    assert biggest <= max(chunk * chunk + k * chunk, n * chunk, (u + v) * k) < u * v // 10


def test_bad_input_is_rejected():
    a, b = _data(10, 4, 3)
    with pytest.raises(ValueError, match="same number of samples"):
        topk_similarity(a, b[:9])
    with pytest.raises(ValueError, match="k must"):
        topk_similarity(a, b, k=0)
    with pytest.raises(TypeError, match="floating"):
        topk_similarity(a.long(), b)
    bad = b.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        topk_similarity(a, bad)
    with pytest.raises(ValueError, match="backend"):
        topk_similarity(a, b, backend="cuda")


@pytest.mark.cuda
@requires_cuda
def test_triton_kernel_on_cuda_at_a_real_size():
    a, b = _data(300, 3000, 700, seed=7)
    a, b = a.cuda(), b.cuda()
    for k in (1, 5):
        vals, idx = topk_similarity(a, b, k=k)
        ref_v, ref_i = topk_similarity(a.cpu(), b.cpu(), k=k)
        torch.testing.assert_close(vals.cpu(), ref_v, rtol=1e-4, atol=1e-5)
        assert (idx.cpu() == ref_i).float().mean() > 0.999  # equal but for near-ties
