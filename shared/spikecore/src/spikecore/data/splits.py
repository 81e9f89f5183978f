"""Deterministic, per-class (stratified) splits of a labelled index for sets without an official split."""

from collections.abc import Sequence

import numpy as np


def stratified_split(
    labels: Sequence[int] | np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Split indices ``0..len(labels)-1`` into ``len(fractions) + 1`` parts, class by class.

    ``fractions`` are the held-out parts (e.g. ``[0.1]`` for a 9:1 train/test split, ``[0.1, 0.2]`` for
    val and test); the first returned part is the remainder (train). Each class is shuffled with its own
    generator derived from ``seed``, so the split does not depend on the order of other classes and is
    identical on every rank.
    """
    labels = np.asarray(labels)
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"split fractions must be >= 0 and sum to < 1, got {list(fractions)}")
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = np.random.default_rng([seed, int(cls)]).permutation(idx)
        start = 0
        for part, frac in enumerate(fractions, start=1):
            n_held = round(len(idx) * frac)
            parts[part].append(idx[start : start + n_held])
            start += n_held
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]
