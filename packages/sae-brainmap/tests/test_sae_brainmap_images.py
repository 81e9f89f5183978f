"""Image sources: the embedded stimuli, a folder, NSD's hdf5; the CLIP preprocessing."""

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from sae_brainmap.brain import BrainDataError, nsd_image_ids
from sae_brainmap.images import (
    EmbeddedImages,
    FolderImages,
    ImageDataError,
    ImageDataset,
    ImageFiles,
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


def _clean(excinfo, path) -> str:
    """One line naming the file; no PIL / h5py traceback chained to it; a BrainDataError (the CLI's)."""
    err = excinfo.value
    assert isinstance(err, BrainDataError) and str(path) in str(err) and "\n" not in str(err)
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return str(err)


@pytest.mark.parametrize("fraction", [0.05, 0.6])
def test_a_truncated_png_is_one_error_naming_the_file(tmp_path, fraction):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"im{i}.png"
        )
    cut = tmp_path / "imgs" / "im1.png"
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * fraction)])
    folder = FolderImages(tmp_path / "imgs")
    assert folder[0].shape == (24, 24, 3)  # the intact one still reads
    with pytest.raises(ImageDataError) as e:
        folder[1]
    assert _clean(e, cut).startswith(f"image file {cut} cannot be read") and "truncated" in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"image file .*gone\.png does not exist"):
        ImageFiles([tmp_path / "gone.png"])[0]


def test_a_truncated_or_wrong_stimuli_file_is_one_error(tmp_path):
    brick = np.random.default_rng(0).integers(0, 256, (5, 9, 9, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "nsd_stimuli.hdf5", "w") as f:
        f["imgBrick"] = brick
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes((tmp_path / "nsd_stimuli.hdf5").read_bytes()[:3000])
    with pytest.raises(ImageDataError) as e:
        NSDImages(cut)
    assert "NSD stimuli file" in _clean(e, cut) and "nsd_stimuli.hdf5 again" in str(e.value)
    with h5py.File(tmp_path / "other.hdf5", "w") as f:
        f["images"] = brick
        f["floats"] = brick / 255.0
    with pytest.raises(
        ImageDataError, match=r"other\.hdf5 has no dataset 'imgBrick' \(found: floats, images\)"
    ):
        NSDImages(tmp_path / "other.hdf5")
    with pytest.raises(ImageDataError, match=r"floats must be uint8 images .* got float64 \(5, 9, 9, 3\)"):
        NSDImages(tmp_path / "other.hdf5", dataset="floats")
    # a file that goes bad after it was opened (read lazily, in a worker) still names the file and image
    src = NSDImages(tmp_path / "nsd_stimuli.hdf5", indices=[3])
    (tmp_path / "nsd_stimuli.hdf5").write_bytes(b"\0" * 4000)
    with pytest.raises(
        ImageDataError, match=r"NSD stimuli file \(image 3\) .*nsd_stimuli\.hdf5 cannot be read"
    ):
        src[0]


def test_fewer_stimuli_than_the_design_refers_to(tmp_path):
    """The design's image ids go up to 99 but the stimuli file holds 5 images: refused, not wrapped around
    or read out of bounds."""
    with h5py.File(tmp_path / "nsd_stimuli.hdf5", "w") as f:
        f["imgBrick"] = np.zeros((5, 4, 4, 3), np.uint8)
    savemat(tmp_path / "nsd_expdesign.mat", {
        "masterordering": np.array([[1, 2, 3, 1]], np.double),
        "subjectim": np.array([[1, 5, 100]], np.double),  # 1-based: the last is 0-based 99
        "sharedix": np.array([[1]], np.double),
    })  # fmt: skip
    nib.save(
        nib.Nifti1Image(np.zeros((2, 2, 2, 4), np.int16), np.eye(4)), tmp_path / "betas_session01.nii.gz"
    )
    ids = nsd_image_ids([tmp_path / "betas_session01.nii.gz"], tmp_path / "nsd_expdesign.mat", 1)
    assert ids.tolist() == [0, 4, 99]
    with pytest.raises(ImageDataError) as e:
        NSDImages(tmp_path / "nsd_stimuli.hdf5", indices=ids.tolist())
    msg = _clean(e, tmp_path / "nsd_stimuli.hdf5")
    assert "holds 5 images but 1 of the 3 image indices asked for are outside 0..4" in msg and "99" in msg
    with pytest.raises(ImageDataError, match=r"e\.g\. -1"):  # a negative index would read from the end
        NSDImages(tmp_path / "nsd_stimuli.hdf5", indices=[0, -1])
    assert len(NSDImages(tmp_path / "nsd_stimuli.hdf5", indices=[0, 4])) == 2
