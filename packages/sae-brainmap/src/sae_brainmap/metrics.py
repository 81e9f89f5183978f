"""SAE quality measures: L0, fraction of variance explained, normalised MSE, dead fraction."""

import torch
from torch import Tensor


@torch.no_grad()
def batch_metrics(x: Tensor, x_hat: Tensor, z: Tensor) -> dict[str, float]:
    """Measures of one batch of tokens ``[n, d]``.

    - ``l0``: mean number of non-zero latents per token;
    - ``fve``: fraction of variance explained, 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2;
    - ``nmse``: mean over tokens of ||x - x_hat||^2 / ||x||^2 (the paper's reconstruction term);
    - ``mse``: mean squared error per coordinate.
    """
    x, x_hat, z = x.float(), x_hat.float(), z.float()
    err = (x - x_hat).pow(2).sum(-1)
    var = (x - x.mean(0)).pow(2).sum()
    return {
        "l0": float((z != 0).sum(-1).float().mean()),
        "fve": float(1 - err.sum() / var.clamp_min(1e-12)),
        "nmse": float((err / x.pow(2).sum(-1).clamp_min(1e-12)).mean()),
        "mse": float(err.mean() / x.shape[-1]),
    }


class FiringCounter:
    """Counts, over many batches, which latents fired at least once: the dead fraction of a window."""

    def __init__(self, n_latents: int) -> None:
        self.fired = torch.zeros(n_latents, dtype=torch.bool)

    @torch.no_grad()
    def update(self, z: Tensor) -> None:
        self.fired |= (z.reshape(-1, z.shape[-1]) != 0).any(0).cpu()

    def dead_fraction(self) -> float:
        return float(1 - self.fired.float().mean())
