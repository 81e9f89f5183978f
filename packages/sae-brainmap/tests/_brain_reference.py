"""Dense float64 numpy references for the brain-side tests (small inputs only)."""

import numpy as np


def dense_similarity(a: np.ndarray, b: np.ndarray, centered: bool = True) -> np.ndarray:
    """The full ``[U, V]`` Pearson r (or cosine) matrix; NaN where a column is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if centered:
        a, b = a - a.mean(0), b - b.mean(0)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (a.T @ b) / np.outer(na, nb)
