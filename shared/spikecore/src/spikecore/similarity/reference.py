"""The oracle: the full similarity matrix in float64, then a stable sort. Small inputs only (tests)."""

import torch


def column_stats(
    x: torch.Tensor, centered: bool, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, in float64: the mean (zeros if not ``centered``) and 1 / norm of the (centred) column,
    0 where the norm is 0 (a constant column: no defined similarity). ``chunk`` columns at a time."""
    chunk = chunk or max(x.shape[1], 1)
    means, inv = [], []
    for i in range(0, x.shape[1], chunk):
        part = x[:, i : i + chunk].double()
        mean = part.mean(0) if centered else torch.zeros(part.shape[1], dtype=torch.float64, device=x.device)
        norm = (part - mean).norm(dim=0)
        if not centered:  # NaN / inf must still show in the statistics (check_finite)
            mean = mean + part.sum(0) * 0
        means.append(mean)
        inv.append(torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm)))
    if not means:
        empty = torch.zeros(0, dtype=torch.float64, device=x.device)
        return empty, empty
    return torch.cat(means), torch.cat(inv)


def topk_similarity_reference(
    a: torch.Tensor, b: torch.Tensor, k: int = 1, centered: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [V, k], indices [V, k])``: for each column v of ``b`` the k columns u of ``a`` with the
    largest similarity, ties to the smaller u. Constant columns of ``a`` never win; a column of ``b``
    with no defined similarity (constant) or slots beyond the valid columns of ``a`` get value 0 and
    index -1."""
    ma, ia = column_stats(a, centered)
    mb, ib = column_stats(b, centered)
    s = ((a.double() - ma) * ia).T @ ((b.double() - mb) * ib)  # [U, V]
    s[ia == 0] = float("-inf")
    order = torch.sort(s, dim=0, descending=True, stable=True)
    vals, idx = order.values[:k].T, order.indices[:k].T
    none = torch.isinf(vals) | (ib == 0)[:, None]
    vals = torch.where(none, torch.zeros_like(vals), vals)
    idx = torch.where(none, torch.full_like(idx, -1), idx)
    return vals.to(torch.float32), idx
