"""Flatmaps on pycortex's S1: the values land on the cortex and the figure is written."""

import numpy as np
import pytest
from PIL import Image

from sae_brainmap.brain.s1 import s1_anatomy
from sae_brainmap.maps import flatmap_png, volume_of


def test_volume_of_places_values_and_checks_lengths():
    vox = np.array([[0, 1, 2], [3, 0, 1]])
    vol = volume_of(np.array([5.0, 7.0]), vox, (4, 2, 3))
    assert vol[0, 1, 2] == 5 and vol[3, 0, 1] == 7 and np.isnan(vol).sum() == 4 * 2 * 3 - 2
    with pytest.raises(ValueError, match="values for"):
        volume_of(np.array([1.0]), vox, (4, 2, 3))


def test_s1_flatmap_png(tmp_path):
    anatomy = s1_anatomy(rois=("V1", "FFA"), cache=tmp_path / "s1.npz")
    vox = np.concatenate([anatomy.rois["V1"], anatomy.rois["FFA"]])
    values = np.concatenate([np.zeros(len(anatomy.rois["V1"])), np.full(len(anatomy.rois["FFA"]), 11.0)])
    path = flatmap_png(values, vox, anatomy.shape, tmp_path / "best_layer.png", "best layer", label="layer")
    img = np.asarray(Image.open(path).convert("RGB"), np.float32)
    assert img.shape[0] > 200 and img.shape[1] > 300
    # the two ROIs' colours (viridis at its two ends: dark purple and yellow) both appear on the map
    purple = ((img[..., 0] < 90) & (img[..., 2] > 60) & (img[..., 1] < 40)).sum()
    yellow = ((img[..., 0] > 200) & (img[..., 1] > 200) & (img[..., 2] < 80)).sum()
    assert purple > 50 and yellow > 50
