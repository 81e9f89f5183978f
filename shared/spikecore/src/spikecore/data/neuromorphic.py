"""Recorded event (neuromorphic) sets through tonic: CIFAR10-DVS, DVS128 Gesture, N-Caltech101.

Each sample is ``[T, 2, H, W]`` float event counts (tonic ``ToFrame`` with ``n_time_bins=T``), optionally
resized to ``frame_size`` and, in training, flipped/rolled as in the SDT/Spikformer DVS recipes.

The frames are binned once and cached on disk (``cache_frames=True``, the default): under ``cache_dir``
(default ``<root>/frame_cache``), one folder per set of framing parameters (``T``, sensor size,
``frame_size``), one compressed ``.npz`` per recording keyed by its path, size and modification time
(:mod:`spikecore.data.frame_cache`). Later epochs (and later runs with the same parameters) neither read
nor bin the recordings; the random flips / rolls still run on every sample. ``cache_frames=False`` bins
every time and writes nothing.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
from tonic.datasets import CIFAR10DVS, NCALTECH101, DVSGesture
from tonic.download_utils import extract_archive

from .base import BaseDataModule
from .errors import DatasetNotFoundError, missing_dataset_message
from .event_readers import (
    NCALTECH101_BACKGROUND,
    cifar10dvs_dir,
    dvsgesture_dir,
    index_cifar10dvs,
    index_dvsgesture,
    index_ncaltech101,
    ncaltech101_dir,
    read_cifar10dvs,
    read_dvsgesture,
    read_ncaltech101,
)
from .events import EventFiles, EventFramesDataset
from .splits import stratified_split
from .transforms import EventFrameAugment


class _EventDataModule(BaseDataModule):
    """Shared plumbing: check the layout (never letting tonic download on its own), download through tonic
    in ``prepare_data`` when asked, and build frame datasets in ``setup``."""

    name: str
    in_chans = 2
    is_sequence = True

    def __init__(
        self,
        root: str,
        batch_size: int,
        num_workers: int,
        download: bool,
        T: int,
        frame_size: int | None,
        native_size: int,
        hflip: float,
        max_shift: int,
        cache_frames: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(root, batch_size, num_workers, download)
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        self.T = T
        self.cache_dir: str | None = (
            (cache_dir if cache_dir is not None else str(Path(root, "frame_cache"))) if cache_frames else None
        )
        self.frame_size = frame_size
        self.img_size = frame_size if frame_size is not None else native_size
        self.train_augment = EventFrameAugment(hflip=hflip, max_shift=max_shift)

    # Subclass hooks ----------------------------------------------------------------------------------
    def layout(self) -> str:
        raise NotImplementedError

    def _problem(self) -> str:
        """Empty when the extracted files are in place, else what is wrong."""
        raise NotImplementedError

    def _download(self) -> None:
        raise NotImplementedError

    def _build_datasets(self) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------------
    def _require(self) -> None:
        problem = self._problem()
        if problem:
            raise DatasetNotFoundError(missing_dataset_message(self.name, self.root, self.layout(), problem))

    def prepare_data(self) -> None:
        # One process per node downloads; setup() on every rank only reads.
        if self.download and self._problem():
            self._download()
        self._require()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._require()
            self._build_datasets()

    def _frames(self, source: EventFiles, indices: np.ndarray, train: bool) -> EventFramesDataset:
        augment: Callable | None = self.train_augment if train else None
        return EventFramesDataset(source, indices, self.T, self.frame_size, augment, cache_dir=self.cache_dir)

    def _split_train_test(self, source: EventFiles, val_split: float, seed: int) -> None:
        """For sets without an official split: per-class hold-out, served for validation and test."""
        train_idx, test_idx = stratified_split(source.labels, [val_split], seed)
        self.train_set = self._frames(source, train_idx, train=True)
        self.test_set = self._frames(source, test_idx, train=False)
        self.val_set = self.test_set


class CIFAR10DVSDataModule(_EventDataModule):
    """CIFAR10-DVS: 10 classes, 128x128, no official split (9:1 per class by ``seed``).

    Layout: ``root/CIFAR10DVS/<class>/*.aedat4`` (tonic's extracted archive). Reading ``.aedat4`` needs
    the ``aedat`` package, as tonic does.
    """

    name = "CIFAR10-DVS"
    num_classes = 10

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 16,
        num_workers: int = 4,
        download: bool = False,
        T: int = 16,
        frame_size: int | None = None,
        hflip: float = 0.5,
        max_shift: int = 5,
        val_split: float = 0.1,
        seed: int = 0,
        cache_frames: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            root, batch_size, num_workers, download, T, frame_size, 128, hflip, max_shift,
            cache_frames, cache_dir,
        )  # fmt: skip
        self.save_hyperparameters()
        self.val_split = val_split
        self.seed = seed

    def layout(self) -> str:
        return f"  {cifar10dvs_dir(self.root)}/{{airplane, automobile, ..., truck}}/*.aedat4"

    def _problem(self) -> str:
        return index_cifar10dvs(self.root)[2]

    def _download(self) -> None:
        CIFAR10DVS(self.root)

    def _build_datasets(self) -> None:
        try:
            import aedat  # noqa: F401
        except ImportError as err:
            raise ImportError("reading CIFAR10-DVS .aedat4 files needs the `aedat` package") from err
        paths, labels, _ = index_cifar10dvs(self.root)
        source = EventFiles(paths, labels, read_cifar10dvs, (128, 128, 2))
        self._split_train_test(source, self.val_split, self.seed)


class DVSGestureDataModule(_EventDataModule):
    """DVS128 Gesture: 11 classes, 128x128, its own train/test split (test also served for validation).

    Layout: ``root/DVSGesture/ibmGestureTrain/user<NN>_<lighting>/<label>.npy`` and the same under
    ``ibmGestureTest`` (tonic's preprocessed release). ``hflip`` defaults to 0: a mirrored left-hand wave
    is a right-hand wave, a different class.
    """

    name = "DVS128 Gesture"
    num_classes = 11

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 16,
        num_workers: int = 4,
        download: bool = False,
        T: int = 16,
        frame_size: int | None = None,
        hflip: float = 0.0,
        max_shift: int = 5,
        cache_frames: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            root, batch_size, num_workers, download, T, frame_size, 128, hflip, max_shift,
            cache_frames, cache_dir,
        )  # fmt: skip
        self.save_hyperparameters()

    def layout(self) -> str:
        dirs = (dvsgesture_dir(self.root, split) for split in ("train", "test"))
        return "\n".join(f"  {d}/user<NN>_<lighting>/<label>.npy   (label 0..10)" for d in dirs)

    def _problem(self) -> str:
        return index_dvsgesture(self.root, "train")[2] or index_dvsgesture(self.root, "test")[2]

    def _download(self) -> None:
        DVSGesture(self.root, train=True)
        DVSGesture(self.root, train=False)

    def _build_datasets(self) -> None:
        sources = {}
        for split in ("train", "test"):
            paths, labels, _ = index_dvsgesture(self.root, split)
            sources[split] = EventFiles(paths, labels, read_dvsgesture, (128, 128, 2))
        self.train_set = self._frames(sources["train"], np.arange(len(sources["train"])), train=True)
        self.test_set = self._frames(sources["test"], np.arange(len(sources["test"])), train=False)
        self.val_set = self.test_set


class NCaltech101DataModule(_EventDataModule):
    """N-Caltech101: 101 classes (``BACKGROUND_Google`` excluded), recordings of varying size resized to
    ``frame_size``; no official split (9:1 per class by ``seed``).

    Layout: ``root/NCALTECH101/Caltech101/<class>/*.bin`` (tonic's extracted archive).
    """

    name = "N-Caltech101"
    num_classes = 101

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 16,
        num_workers: int = 4,
        download: bool = False,
        T: int = 16,
        frame_size: int = 128,
        hflip: float = 0.5,
        max_shift: int = 5,
        val_split: float = 0.1,
        seed: int = 0,
        cache_frames: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            root, batch_size, num_workers, download, T, frame_size, frame_size, hflip, max_shift,
            cache_frames, cache_dir,
        )  # fmt: skip
        self.save_hyperparameters()
        self.val_split = val_split
        self.seed = seed

    def layout(self) -> str:
        base = ncaltech101_dir(self.root)
        return f"  {base}/<class>/*.bin   (101 class folders; {NCALTECH101_BACKGROUND} is ignored)"

    def _problem(self) -> str:
        return index_ncaltech101(self.root, self.num_classes)[2]

    def _download(self) -> None:
        NCALTECH101(self.root)
        # tonic extracts the outer archive only; the recordings are in an inner Caltech101.zip.
        base = ncaltech101_dir(self.root).parent
        if not ncaltech101_dir(self.root).is_dir():
            for inner in sorted(base.rglob(NCALTECH101.data_filename)):
                extract_archive(str(inner), str(base))

    def _build_datasets(self) -> None:
        paths, labels, _ = index_ncaltech101(self.root, self.num_classes)
        # Sensor size None: each recording's own extent, then resized to frame_size.
        source = EventFiles(paths, labels, read_ncaltech101, None)
        self._split_train_test(source, self.val_split, self.seed)
