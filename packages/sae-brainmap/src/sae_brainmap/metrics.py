"""SAE quality measures: L0, fraction of variance explained, normalised MSE, dead fraction."""

import torch
from torch import Tensor
from torchmetrics import Metric


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


class EpochMeasures(Metric):
    """One SAE's measures over an epoch, exact over every process of a DDP run.

    ``update(measures, z)`` adds one batch: its :func:`batch_metrics` (and ``loss``), weighted by its
    number of tokens, and which latents fired in ``z`` ``[n, n_latents]``. ``compute()`` gives the
    token-weighted mean of each measure over every batch of every process (the states are sums, reduced by
    summing across processes, so uneven shards weigh right; with batches of equal size this is the plain
    mean over batches) and ``dead_fraction``: the fraction of latents that fired on no token of any process.
    The states are not saved in checkpoints (torchmetrics' states are not persistent)."""

    full_state_update = False

    def __init__(self, n_latents: int, keys: tuple[str, ...] = ("l0", "fve", "nmse", "mse", "loss"), **kw):
        super().__init__(**kw)
        self.keys = tuple(keys)
        dtype = torch.float64  # as exact as Python floats; on MPS (no float64) use set_dtype(torch.float32)
        self.add_state("totals", torch.zeros(len(self.keys), dtype=dtype), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        self.add_state("fired", torch.zeros(n_latents, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, measures: dict[str, float], z: Tensor) -> None:
        z = z.reshape(-1, z.shape[-1])
        n = z.shape[0]
        values = torch.tensor([measures[k] for k in self.keys], dtype=self.totals.dtype)
        self.totals += values.to(self.totals.device) * n
        self.tokens += n
        self.fired += (z != 0).any(0).to(self.fired.device, torch.long)

    def compute(self) -> dict[str, float]:
        means = self.totals / self.tokens.clamp_min(1)
        out = {k: float(v) for k, v in zip(self.keys, means.tolist(), strict=True)}
        out["dead_fraction"] = float(1 - (self.fired > 0).float().mean())
        return out
