"""The analysis estimators against scikit-learn's plug-in mutual information (an independent reference)."""

import math

import pytest
import torch
from sklearn.metrics import mutual_info_score

from tdformer.analysis import binary_mi_bits, discrete_mi_bits


def _miller_madow_bits(a, b) -> float:
    """sklearn's plug-in MI plus the Miller-Madow terms (bins used - 1) / 2n of H(a) + H(b) - H(a, b)."""
    n = len(a)
    used = lambda v: len(set(v))  # noqa: E731
    joint = list(zip(a, b, strict=True))
    corr = ((used(a) - 1) + (used(b) - 1) - (used(joint) - 1)) / (2 * n)
    return max(mutual_info_score(a, b) + corr, 0.0) / math.log(2)


@pytest.mark.parametrize("levels", [2, 3, 5])
def test_discrete_mi_matches_sklearn(levels):
    g = torch.Generator().manual_seed(levels)
    n, units = 400, 6
    a = torch.randint(0, levels, (n, units), generator=g)
    noise = torch.randint(0, levels, (n, units), generator=g)
    keep = torch.rand(n, units, generator=g) < torch.linspace(0, 1, units)  # from independent to identical
    b = torch.where(keep, a, noise)
    ours = discrete_mi_bits(a, b, levels)
    ref = sum(_miller_madow_bits(a[:, u].tolist(), b[:, u].tolist()) for u in range(units)) / units
    assert ours == pytest.approx(ref, abs=1e-9)


def test_binary_mi_limits():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(20000, 3, generator=g) < 0.5
    assert binary_mi_bits(a, a) == pytest.approx(1.0, abs=1e-3)  # identical fair coins: 1 bit
    b = torch.rand(20000, 3, generator=g) < 0.5
    assert binary_mi_bits(a, b) == pytest.approx(0.0, abs=2e-3)  # independent: ~0
