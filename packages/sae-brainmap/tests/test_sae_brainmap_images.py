"""Image sources: the embedded stimuli, a folder, NSD's hdf5; the CLIP preprocessing."""

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from sae_brainmap.images import (
    EmbeddedImages,
    FolderImages,
    ImageDataset,
    NSDImages,
    make_source,
    to_model_input,
)

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def test_embedded_stimuli_are_a_few_hundred_distinct_deterministic_images():
    src = EmbeddedImages(300, seed=0)
    assert len(src) == 300 and len(src.originals) >= 200 + 15  # photographs + lfw_subset
    imgs = [src[i] for i in range(300)]
    assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in imgs)
    digests = {hash(im.tobytes()) for im in imgs}
    assert len(digests) == 300  # augmentation makes every stimulus distinct
    again = EmbeddedImages(300, seed=0)
    assert np.array_equal(again[250], imgs[250])
    assert not np.array_equal(EmbeddedImages(300, seed=1)[250], imgs[250])
    with pytest.raises(IndexError):
        src[300]


def test_folder_and_nsd_sources_return_the_stored_pixels(tmp_path):
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8) for i in range(3)]
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i, p in enumerate(pics):
        Image.fromarray(p).save(tmp_path / "imgs" / ("sub" if i == 2 else "") / f"im{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    folder = FolderImages(tmp_path / "imgs")
    assert len(folder) == 3
    got = sorted((folder[i] for i in range(3)), key=lambda a: a.shape[0])
    for a, b in zip(got, pics, strict=True):
        assert np.array_equal(a, b)

    brick = rng.integers(0, 256, (5, 17, 17, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "nsd_stimuli.hdf5", "w") as f:
        f["imgBrick"] = brick
    nsd = NSDImages(tmp_path / "nsd_stimuli.hdf5", indices=[4, 1])
    assert len(nsd) == 2 and np.array_equal(nsd[0], brick[4]) and np.array_equal(nsd[1], brick[1])
    assert len(make_source("nsd", str(tmp_path / "nsd_stimuli.hdf5"))) == 5
    with pytest.raises(FileNotFoundError):
        FolderImages(tmp_path / "missing")
    with pytest.raises(ValueError, match="needs a path"):
        make_source("folder")


def test_transform_resizes_crops_and_normalises():
    img = np.full((40, 80, 3), 128, dtype=np.uint8)
    img[:, :20] = 0  # the left quarter is cropped away by a centre crop of the short side
    x = to_model_input(img, (16, 16), MEAN, STD)
    assert x.shape == (3, 16, 16)
    expected = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x[:, 8, 8], expected, atol=1e-5, rtol=0)
    ds = ImageDataset(EmbeddedImages(4), (32, 32), MEAN, STD)
    assert ds[3].shape == (3, 32, 32)
