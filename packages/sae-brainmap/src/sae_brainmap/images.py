"""Image sources (a folder, a list of files, NSD's ``nsd_stimuli.hdf5``, the embedded photographs) and the
backbones' input transform.

A source returns uint8 ``[H, W, 3]`` arrays; :class:`ImageDataset` turns them into normalised tensors.
A missing folder or file is a FileNotFoundError; an image or stimuli file that cannot be read (truncated,
corrupted, the wrong layout) or indices the stimuli file does not have are one :class:`ImageDataError`
naming the file, never PIL's or h5py's own traceback.
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .brain.errors import BrainDataError, reading

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# scikit-image's photographs that ship inside the wheel (others, e.g. eagle, would be downloaded).
SKIMAGE_PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)


class ImageDataError(BrainDataError):
    """A stimulus image (or NSD's stimuli file) cannot be read, or does not hold the images asked for. A
    BrainDataError, as the stimuli are part of the dataset: the CLI reports it as one line."""


IMAGE_FIX = "replace it with an intact copy (download or export it again)"


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


class ImageFiles:
    """Image files read in exactly the order given: for datasets whose responses are rows in a known image
    order (Algonauts 2023's training images), where a folder's own sort order must not decide it."""

    def __init__(self, paths) -> None:
        self.paths = [Path(p).expanduser() for p in paths]
        if not self.paths:
            raise FileNotFoundError("no image files given")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        from PIL import Image

        path = self.paths[i]
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        with reading(path, "image file", ImageDataError, IMAGE_FIX), Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))  # decodes every byte: a truncated file fails here
        return to_rgb_uint8(pixels)


class FolderImages(ImageFiles):
    """Every image file under ``root`` (recursively, sorted by path)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")
        super().__init__(paths)


class NSDImages:
    """NSD's stimuli: ``nsd_stimuli.hdf5`` dataset ``imgBrick`` (73000, 425, 425, 3) uint8, optionally a
    subset of its (0-based) indices, e.g. the design's image ids. The file is opened lazily in each worker
    process. Indices outside ``0..len - 1`` (the design refers to images the file does not have, or an id
    that was 1-based) are refused here, before any image is read."""

    def __init__(self, path: str | Path, indices: list[int] | None = None, dataset: str = "imgBrick") -> None:
        import h5py

        self.path, self.dataset = Path(path).expanduser(), dataset
        if not self.path.is_file():
            raise FileNotFoundError(f"NSD stimuli file {self.path} does not exist")
        what = "NSD stimuli file"
        with reading(self.path, what, ImageDataError, "download nsd_stimuli.hdf5 again"):
            with h5py.File(self.path, "r") as f:
                if dataset not in f or not hasattr(f[dataset], "shape"):
                    found = ", ".join(f) or "nothing"
                    raise ImageDataError(
                        f"{what} {self.path} has no dataset {dataset!r} (found: {found}); NSD's "
                        "nsd_stimuli.hdf5 holds 'imgBrick'"
                    )
                shape, dtype = f[dataset].shape, f[dataset].dtype
        if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
            raise ImageDataError(
                f"{what} {self.path}: {dataset} must be uint8 images (N, H, W, 3) as NSD's (73000, 425, 425, "
                f"3), got {dtype} {tuple(shape)}"
            )
        n = shape[0]
        self.indices = list(range(n)) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise ImageDataError(
                f"{what} {self.path} holds {n} images but {len(bad)} of the {len(self.indices)} image "
                f"indices asked for are outside 0..{n - 1} (0-based; e.g. {bad[0]}, largest "
                f"{max(bad)}): the design refers to images this file does not have. Use the full "
                "nsd_stimuli.hdf5 (73,000 images) with NSD's nsd_expdesign.mat"
            )
        self._file = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        import h5py

        index = self.indices[i]
        with reading(self.path, f"NSD stimuli file (image {index})", ImageDataError, "download it again"):
            if self._file is None:
                self._file = h5py.File(self.path, "r")
            pixels = self._file[self.dataset][index]
        return to_rgb_uint8(pixels)

    def __getstate__(self) -> dict:  # h5py handles do not cross process boundaries
        return {**self.__dict__, "_file": None}


def embedded_originals() -> list[np.ndarray]:
    """scikit-image's bundled photographs plus the 200 faces and non-faces of ``lfw_subset``."""
    from skimage import data

    out = []
    for name in SKIMAGE_PHOTOS:
        try:
            out.append(to_rgb_uint8(getattr(data, name)()))
        except Exception:  # an image this scikit-image version would have to download: skip it
            continue
    out += [to_rgb_uint8(img) for img in data.lfw_subset()]
    return out


class EmbeddedImages:
    """A few hundred stimuli from the embedded images: random crops (30-100% of the side), flips and
    small brightness changes, fixed by ``seed``. No file, no download."""

    def __init__(self, n_images: int = 300, seed: int = 0) -> None:
        self.originals = embedded_originals()
        self.n_images, self.seed = n_images, seed

    def __len__(self) -> int:
        return self.n_images

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n_images:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, i])
        img = self.originals[i % len(self.originals)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0)) if i >= len(self.originals) else min(h, w)
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = img[top : top + side, left : left + side]
        if i >= len(self.originals):  # the first pass over the originals is left untouched
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = np.clip(crop.astype(np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(crop)


CROP_MODES = ("center", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def to_model_input(
    img: np.ndarray,
    size: tuple[int, int],
    mean,
    std,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    crop_mode: str = "center",
) -> Tensor:
    """uint8 ``[H, W, 3]`` -> float ``[3, h, w]``, timm's evaluation transform on a tensor: resize
    (antialiased) to ``size / crop_pct`` (``center``: the short side, keeping the aspect ratio; ``squash``:
    both sides), centre crop ``size``, normalise. ``crop_pct`` 1 with bicubic interpolation is CLIP's
    preprocessing (resize the short side, centre crop), the default. It works on float pixels rather than
    PIL's uint8, and where torchvision truncates the long side and rounds the crop's offset half to even, it
    rounds the long side to the nearest pixel and the offset down: a non-square image can sit one pixel off
    timm's; a square one differs by resampling only."""
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)[None]
    h, w = x.shape[-2:]
    scaled = (math.floor(size[0] / crop_pct), math.floor(size[1] / crop_pct))
    if crop_mode == "squash":
        nh, nw = scaled
    else:
        scale = max(scaled[0] / h, scaled[1] / w)
        nh, nw = max(scaled[0], round(h * scale)), max(scaled[1], round(w * scale))
    if interpolation == "nearest":
        x = F.interpolate(x, size=(nh, nw), mode="nearest")
    else:
        x = F.interpolate(x, size=(nh, nw), mode=interpolation, antialias=True, align_corners=False)
    x = x.clamp_(0, 1)
    top, left = (nh - size[0]) // 2, (nw - size[1]) // 2
    x = x[0, :, top : top + size[0], left : left + size[1]]
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class ImageDataset(torch.utils.data.Dataset):
    """``source[i]`` as a model input tensor (:func:`to_model_input` with these settings; a backbone's own
    are ``ImageDataset(source, **backbone.preprocessing)``)."""

    def __init__(
        self,
        source,
        size: tuple[int, int],
        mean,
        std,
        crop_pct: float = 1.0,
        interpolation: str = "bicubic",
        crop_mode: str = "center",
    ) -> None:
        self.source, self.size, self.mean, self.std = source, tuple(size), tuple(mean), tuple(std)
        self.crop_pct, self.interpolation, self.crop_mode = float(crop_pct), interpolation, crop_mode

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Tensor:
        return to_model_input(
            self.source[i], self.size, self.mean, self.std, self.crop_pct, self.interpolation, self.crop_mode
        )


def make_source(kind: str = "embedded", path: str | None = None, n_images: int = 300, seed: int = 0):
    """``embedded`` (default), ``folder`` (``path`` = a folder) or ``nsd`` (``path`` = nsd_stimuli.hdf5)."""
    if kind == "embedded":
        return EmbeddedImages(n_images, seed)
    if path is None:
        raise ValueError(f"image source {kind!r} needs a path")
    if kind == "folder":
        return FolderImages(path)
    if kind == "nsd":
        return NSDImages(path)
    raise ValueError(f"unknown image source {kind!r}: embedded, folder or nsd")
