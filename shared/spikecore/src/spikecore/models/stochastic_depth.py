"""Stochastic depth for time-major spiking tensors ``[T, B, ...]``.

Stochastic depth drops a *sample's* residual branch. timm's ``DropPath`` draws one keep / drop per index of
dim 0, which for a time-major ``[T, B, ...]`` tensor is one per *time step* for the whole batch. Here the
decision is drawn per index of ``batch_dim`` (mask shape ``(1, B, 1, ...)``) and broadcast over time, so a
sample's branch is either kept at every step (scaled by ``1 / keep_prob``, as timm scales) or dropped at
every step. Evaluation mode is the identity.

A network that runs one sample's sequence in several calls (TDFormer's segments) keeps the decision over
the calls with :func:`hold_drop_path_masks`.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["TimeMajorDropPath", "drop_path", "drop_path_mask", "hold_drop_path_masks"]


def _check_prob(drop_prob: float) -> None:
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")


def drop_path_mask(
    x: torch.Tensor, drop_prob: float, batch_dim: int = 1, scale_by_keep: bool = True
) -> torch.Tensor:
    """A keep mask for ``x``: shape 1 everywhere but ``x.shape[batch_dim]`` at ``batch_dim``, entries 0
    (dropped, probability ``drop_prob``) or ``1 / (1 - drop_prob)`` (kept; 1 with ``scale_by_keep=False``),
    in ``x``'s dtype and device. Drawn as timm's ``drop_path`` draws its mask."""
    _check_prob(drop_prob)
    shape = [1] * x.dim()
    shape[batch_dim] = x.shape[batch_dim]
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        mask.div_(keep_prob)
    return mask


def drop_path(
    x: torch.Tensor,
    drop_prob: float = 0.0,
    training: bool = False,
    batch_dim: int = 1,
    scale_by_keep: bool = True,
) -> torch.Tensor:
    """Stochastic depth per sample of ``x`` (samples along ``batch_dim``; 1 for ``[T, B, ...]``, 0 for
    ``[B, T, ...]``): each sample is zeroed with probability ``drop_prob``, at every other index (every time
    step) alike, and the kept ones are scaled by ``1 / (1 - drop_prob)``. ``x`` itself when not training
    or ``drop_prob == 0``. Equal to timm's ``drop_path`` on ``x.movedim(batch_dim, 0)``, moved back."""
    if drop_prob == 0.0 or not training:
        return x
    return x * drop_path_mask(x, drop_prob, batch_dim, scale_by_keep)


class TimeMajorDropPath(nn.Module):
    """:func:`drop_path` as a module: per-sample stochastic depth on ``[T, B, ...]`` (``batch_dim=1``).

    Inside :func:`hold_drop_path_masks` the mask drawn at the first call is reused by later calls (the same
    samples dropped in every segment of one sequence); otherwise every call draws a new one.
    """

    def __init__(self, drop_prob: float = 0.0, batch_dim: int = 1, scale_by_keep: bool = True):
        super().__init__()
        _check_prob(drop_prob)
        self.drop_prob = float(drop_prob)
        self.batch_dim = batch_dim
        self.scale_by_keep = scale_by_keep
        self._hold = False
        self._mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        if not self._hold:
            return x * drop_path_mask(x, self.drop_prob, self.batch_dim, self.scale_by_keep)
        if self._mask is None:
            self._mask = drop_path_mask(x, self.drop_prob, self.batch_dim, self.scale_by_keep)
        elif self._mask.dim() != x.dim() or self._mask.shape[self.batch_dim] != x.shape[self.batch_dim]:
            raise ValueError(
                f"the held drop-path mask {tuple(self._mask.shape)} does not fit an input of shape "
                f"{tuple(x.shape)}: one hold_drop_path_masks block is for one batch"
            )
        return x * self._mask.to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}, batch_dim={self.batch_dim}"


@contextmanager
def hold_drop_path_masks(module: nn.Module) -> Iterator[None]:
    """Within the block, every :class:`TimeMajorDropPath` of ``module`` draws its mask once (at its first
    call) and reuses it, so that several calls on the same batch (one sequence run as segments) drop the
    same samples' branches. Masks are discarded on exit. Nested blocks keep the outer block's masks."""
    fresh = [m for m in module.modules() if isinstance(m, TimeMajorDropPath) and not m._hold]
    for m in fresh:
        m._hold, m._mask = True, None
    try:
        yield
    finally:
        for m in fresh:
            m._hold, m._mask = False, None
