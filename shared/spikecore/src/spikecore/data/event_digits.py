"""Embedded event-camera default: the scikit-learn digits recorded by a simulated event sensor during
N-MNIST-like saccades (see :mod:`.saccade_events`), then served through the same events -> frames path
as the recorded sets. Nothing is downloaded, nothing is written unless ``cache_frames=True``, and
everything is derived deterministically from ``seed``."""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from .base import BaseDataModule
from .events import EventArrays, EventFramesDataset
from .saccade_events import SaccadeSensor, simulate_saccade_events
from .splits import stratified_split
from .transforms import EventFrameAugment


class EventDigitsDataModule(BaseDataModule):
    """Generated event digits: ``[T, 2, S, S]`` frames (S = ``frame_size`` or ``sensor_size``), 10 classes,
    a per-class train/val/test split by ``seed``.

    Args:
        root, download: unused (generated in memory); kept for a uniform interface.
        T: time bins per sample (tonic ``ToFrame(n_time_bins=T)``).
        sensor_size: side of the simulated sensor; ``digit_size`` the digit's side on it.
        saccade_amplitude: saccade size in pixels; ``contrast_threshold`` the log-intensity threshold.
        frame_size: resize frames to this side (None keeps ``sensor_size``).
        hflip, max_shift: the DVS flip/roll recipe for training (flips off by default, as for digits).
        val_split, test_split: held-out fractions, per class.
        cache_frames: keep the binned frames on disk under ``cache_dir`` (default ``<root>/frame_cache``),
            keyed by the framing parameters and a digest of each recording's events; off by default, as
            the generated events live in memory and binning them is cheap.
    """

    num_classes = 10
    in_chans = 2
    is_sequence = True

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        download: bool = False,
        T: int = 8,
        sensor_size: int = 34,
        digit_size: int = 28,
        saccade_amplitude: float = 3.0,
        contrast_threshold: float = 0.5,
        frame_size: int | None = None,
        hflip: float = 0.0,
        max_shift: int = 2,
        val_split: float = 0.1,
        test_split: float = 0.2,
        seed: int = 0,
        cache_frames: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(root, batch_size, num_workers, download)
        self.save_hyperparameters()
        self.T = T
        self.sensor = SaccadeSensor(
            sensor_size=sensor_size,
            image_size=digit_size,
            amplitude=saccade_amplitude,
            threshold=contrast_threshold,
        )
        self.frame_size = frame_size
        self.img_size = frame_size if frame_size is not None else sensor_size
        self.train_augment = EventFrameAugment(hflip=hflip, max_shift=max_shift)
        self.val_split = val_split
        self.test_split = test_split
        self.seed = seed
        self.source: EventArrays | None = None
        self.cache_dir: str | None = (
            (cache_dir if cache_dir is not None else str(Path(root, "frame_cache"))) if cache_frames else None
        )

    def generate(self) -> EventArrays:
        """All 1797 recordings (in scikit-learn's order) as one event source."""
        digits = load_digits()
        events, offsets = simulate_saccade_events(digits.images / 16.0, self.sensor, self.seed)
        return EventArrays(events, offsets, digits.target.astype(np.int64), self.sensor.tonic_sensor_size)

    def setup(self, stage: str | None = None) -> None:
        # Generated in memory identically on every rank; nothing to download or cache in prepare_data.
        if self.train_set is not None:
            return
        self.source = self.generate()
        train_idx, val_idx, test_idx = stratified_split(
            self.source.labels, [self.val_split, self.test_split], self.seed
        )
        augment, cache = self.train_augment, self.cache_dir
        self.train_set = EventFramesDataset(self.source, train_idx, self.T, self.frame_size, augment, cache)
        self.val_set = EventFramesDataset(self.source, val_idx, self.T, self.frame_size, cache_dir=cache)
        self.test_set = EventFramesDataset(self.source, test_idx, self.T, self.frame_size, cache_dir=cache)
