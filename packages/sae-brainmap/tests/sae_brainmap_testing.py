"""Shared test data for sae-brainmap's tests (a module with a unique name, importable from any rootdir)."""

import torch


def planted_data() -> tuple[torch.Tensor, torch.Tensor]:
    """x = D z + noise: 64 unit-norm atoms in 32 dims, 3 active per sample with positive coefficients."""
    # Not seed 0: SAEs initialise from seed 0, and the same stream would plant their own init as D.
    gen = torch.Generator().manual_seed(1234)
    d, m, n, k = 32, 64, 20000, 3
    D = torch.randn(m, d, generator=gen)
    D = D / D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=gen).argsort(1)[:, :k]
    coef = torch.zeros(n, m).scatter(1, idx, 0.5 + torch.rand(n, k, generator=gen))
    return D, coef @ D + 0.01 * torch.randn(n, d, generator=gen)


def recovery(D: torch.Tensor, learned: torch.Tensor) -> float:
    """Mean over true atoms of the best cosine with a learned direction."""
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((D @ learned.T).max(1).values.mean())
