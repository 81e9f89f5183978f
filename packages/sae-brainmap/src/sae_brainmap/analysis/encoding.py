"""The encoding baseline: ridge regression from the model's final embedding to every voxel.

scikit-learn's ``RidgeCV`` (efficient leave-one-out over a grid of penalties, one per voxel) fits on the
training images; R^2 is measured on held-out images and, where a noise ceiling is given (percent of
explainable variance, NSD's ``ncsnr``), also as a fraction of it.
"""

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import RidgeCV


@dataclass
class EncodingResult:
    r2: np.ndarray  # [V] held-out R^2
    alpha: np.ndarray  # [V] chosen penalty
    r2_over_ceiling: np.ndarray | None  # [V] R^2 / (noise ceiling / 100), where a ceiling is given


def ridge_encoding(
    features_train: np.ndarray,
    responses_train: np.ndarray,
    features_test: np.ndarray,
    responses_test: np.ndarray,
    noise_ceiling_pct: np.ndarray | None = None,
    alphas: np.ndarray | None = None,
) -> EncodingResult:
    """Fit on the training images, score on the test images (R^2 per voxel)."""
    if (
        features_train.shape[0] != responses_train.shape[0]
        or features_test.shape[0] != responses_test.shape[0]
    ):
        raise ValueError("features and responses must have the same number of images (rows)")
    alphas = np.logspace(-2, 5, 15) if alphas is None else np.asarray(alphas)
    mean, std = features_train.mean(0), features_train.std(0) + 1e-12
    model = RidgeCV(alphas=alphas, alpha_per_target=True)
    model.fit((features_train - mean) / std, responses_train)
    pred = model.predict((features_test - mean) / std)
    resid = ((responses_test - pred) ** 2).sum(0)
    total = ((responses_test - responses_test.mean(0)) ** 2).sum(0)
    r2 = 1 - resid / np.where(total > 0, total, np.nan)
    ratio = None
    if noise_ceiling_pct is not None:
        ceiling = np.asarray(noise_ceiling_pct, np.float64) / 100
        ratio = np.where(ceiling > 0, r2 / np.where(ceiling > 0, ceiling, 1), np.nan)
    return EncodingResult(r2=r2, alpha=np.broadcast_to(model.alpha_, r2.shape).copy(), r2_over_ceiling=ratio)
