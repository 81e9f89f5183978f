"""tonic's on-disk layouts for the recorded event sets: finding the files and reading one recording.

tonic's dataset constructors download whenever their own existence check fails (which also wants the
downloaded archive), so the data modules index the extracted files here and read them with tonic's
readers; a tonic dataset is constructed only to download, when ``download=True``.
"""

from pathlib import Path

import numpy as np
from tonic.datasets import CIFAR10DVS, NCALTECH101, DVSGesture
from tonic.io import make_structured_array, read_aedat4, read_mnist_file

# tonic stores each set under root/<its class name>.
CIFAR10DVS_CLASSES: tuple[str, ...] = tuple(sorted(CIFAR10DVS.classes, key=CIFAR10DVS.classes.get))
DVSGESTURE_SPLIT_DIRS = {"train": "ibmGestureTrain", "test": "ibmGestureTest"}
NCALTECH101_BACKGROUND = "BACKGROUND_Google"


def cifar10dvs_dir(root: str) -> Path:
    return Path(root, CIFAR10DVS.__name__)


def dvsgesture_dir(root: str, split: str) -> Path:
    return Path(root, DVSGesture.__name__, DVSGESTURE_SPLIT_DIRS[split])


def ncaltech101_dir(root: str) -> Path:
    return Path(root, NCALTECH101.__name__, NCALTECH101.folder_name)


def index_cifar10dvs(root: str) -> tuple[list[str], np.ndarray, str]:
    """``(paths, labels, problem)``; ``problem`` is "" when all ten class folders hold recordings."""
    base = cifar10dvs_dir(root)
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(CIFAR10DVS_CLASSES):
        files = sorted(Path(base, name).glob("*.aedat4"))
        if not files:
            return [], np.empty(0, np.int64), f"no {name}/*.aedat4 in {base}"
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64), ""


def index_dvsgesture(root: str, split: str) -> tuple[list[str], np.ndarray, str]:
    """``(paths, labels, problem)`` of one split; the label is the file stem (0..10), as in tonic."""
    base = dvsgesture_dir(root, split)
    files = sorted(base.glob("user*_*/*.npy"))
    if not files:
        return [], np.empty(0, np.int64), f"no user*_*/<label>.npy files in {base}"
    labels = []
    for f in files:
        if not f.stem.isdigit() or int(f.stem) >= len(DVSGesture.classes):
            return [], np.empty(0, np.int64), f"{f} is not named <label>.npy with label in 0..10"
        labels.append(int(f.stem))
    return [str(f) for f in files], np.asarray(labels, dtype=np.int64), ""


def index_ncaltech101(root: str, num_classes: int) -> tuple[list[str], np.ndarray, str]:
    """``(paths, labels, problem)``; labels follow the sorted class folders, background excluded."""
    base = ncaltech101_dir(root)
    class_dirs = (
        sorted(d for d in base.iterdir() if d.is_dir() and d.name != NCALTECH101_BACKGROUND)
        if base.is_dir()
        else []
    )
    if len(class_dirs) != num_classes:
        return [], np.empty(0, np.int64), f"{len(class_dirs)} class folders in {base}, expected {num_classes}"
    paths: list[str] = []
    labels: list[int] = []
    for label, d in enumerate(class_dirs):
        files = sorted(d.glob("*.bin"))
        if not files:
            return [], np.empty(0, np.int64), f"no *.bin in {d}"
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64), ""


def read_cifar10dvs(path: str) -> np.ndarray:
    """One CIFAR10-DVS recording (needs the ``aedat`` package, as tonic does)."""
    events = read_aedat4(path)
    events.dtype.names = ["t", "x", "y", "p"]  # tonic's own renaming of aedat's fields
    return events


def read_dvsgesture(path: str) -> np.ndarray:
    """One DVS Gesture sample: an ``[N, 4]`` (x, y, p, t in ms) ``.npy``, timestamps made microseconds."""
    raw = np.load(path, allow_pickle=False)  # never unpickle a data file
    if raw.ndim != 2 or raw.shape[1] != 4:
        raise ValueError(f"{path}: expected an [N, 4] (x, y, p, t) array, got shape {raw.shape}")
    t_us = np.rint(raw[:, 3].astype(np.float64) * 1000).astype(np.int64)
    return make_structured_array(raw[:, 0], raw[:, 1], raw[:, 2], t_us, dtype=DVSGesture.dtype)


def read_ncaltech101(path: str) -> np.ndarray:
    """One N-Caltech101 recording (N-MNIST binary format), shifted to start at x = y = 0 like tonic."""
    events = read_mnist_file(path, dtype=NCALTECH101.dtype)
    if len(events):
        events["x"] -= events["x"].min()
        events["y"] -= events["y"].min()
    return events
