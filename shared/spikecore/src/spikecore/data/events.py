"""Events to frames: the one path every event set (recorded or generated) goes through.

Events are tonic-style structured arrays with fields ``x, y, t, p`` sorted by ``t``; tonic's ``ToFrame``
with ``n_time_bins=T`` turns them into ``[T, 2, H, W]`` counts, which become a float tensor, optionally
resized and augmented. With a ``cache_dir`` the (resized) frames of each recording are kept on disk
(:class:`~spikecore.data.frame_cache.FrameCache`, keyed by the framing parameters and the recording's
identity), so later epochs neither read nor bin the recordings again; augmentation runs on the cached
frames.
"""

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tonic.transforms import ToFrame
from torch.utils.data import Dataset

from .frame_cache import FrameCache


def events_to_frames(
    events: np.ndarray, n_time_bins: int, sensor_size: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """``[T, P, H, W]`` float32 event counts from tonic's ``ToFrame(sensor_size, n_time_bins=T)``.

    ``sensor_size`` is tonic's ``(W, H, P)``. ``None`` takes W and H from the events (for recordings of
    varying size) but always two polarities, which tonic's own inference would not guarantee.
    """
    if sensor_size is None:
        if len(events) == 0:
            raise ValueError("cannot infer the sensor size of an empty recording; pass sensor_size")
        sensor_size = (int(events["x"].max()) + 1, int(events["y"].max()) + 1, 2)
    width, height, polarities = sensor_size
    if len(events) == 0:
        # tonic's empty-input branch returns [T, P, W, H]; build the right shape here instead.
        return torch.zeros(n_time_bins, polarities, height, width)
    if np.any(np.diff(events["t"].astype(np.int64)) < 0):
        # tonic slices by searchsorted on t, which silently drops events of an unsorted recording.
        events = events[np.argsort(events["t"], kind="stable")]
    frames = ToFrame(sensor_size=sensor_size, n_time_bins=n_time_bins)(events)
    return torch.from_numpy(frames.astype(np.float32))


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, anti-aliased resize of ``[T, P, H, W]`` frames to ``[T, P, size, size]``."""
    if frames.shape[-2:] == (size, size):
        return frames
    return F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class EventSource:
    """Where a set's recordings come from: ``labels``, ``sensor_size`` (tonic's ``(W, H, P)`` or None
    when it varies per recording) and ``events(i)``."""

    labels: np.ndarray
    sensor_size: tuple[int, int, int] | None

    def events(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def identity(self, index: int) -> str | None:
        """What recording ``index`` is, for the frame cache (changes whenever its events may); ``None``
        when unknown (the recording is then never cached)."""
        return None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class EventFiles(EventSource):
    """One recording per file, read by ``reader`` (a module-level function, so workers can pickle it)."""

    paths: Sequence[str]
    labels: np.ndarray
    reader: Callable[[str], np.ndarray]
    sensor_size: tuple[int, int, int] | None

    def events(self, index: int) -> np.ndarray:
        return self.reader(self.paths[index])

    def identity(self, index: int) -> str:
        """Absolute path, size and modification time of the file, and the reader that decodes it."""
        path = Path(self.paths[index]).resolve()
        st = os.stat(path)
        reader = f"{getattr(self.reader, '__module__', '?')}.{getattr(self.reader, '__qualname__', '?')}"
        return f"file:{path}:{st.st_size}:{st.st_mtime_ns}:{reader}"


@dataclass
class EventArrays(EventSource):
    """All recordings in one structured array; recording ``i`` is ``events[offsets[i]:offsets[i + 1]]``."""

    all_events: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    sensor_size: tuple[int, int, int] | None

    def events(self, index: int) -> np.ndarray:
        return self.all_events[self.offsets[index] : self.offsets[index + 1]]

    def identity(self, index: int) -> str:
        """A digest of the recording's events (and their dtype)."""
        events = np.ascontiguousarray(self.events(index))
        digest = hashlib.blake2b(events.tobytes(), digest_size=20)
        digest.update(str(events.dtype.descr).encode())
        return f"events:{digest.hexdigest()}"


class EventFramesDataset(Dataset):
    """``(frames [T, 2, S, S], label)`` for the recordings ``indices`` of ``source``.

    ``cache_dir``: keep each recording's frames (after the resize, before ``augment``) in a
    :class:`~spikecore.data.frame_cache.FrameCache` there, keyed by ``n_time_bins``, the source's sensor
    size, ``frame_size`` and the recording's identity; ``None`` (default) bins every time.
    """

    def __init__(
        self,
        source: EventSource,
        indices: Sequence[int] | np.ndarray,
        n_time_bins: int,
        frame_size: int | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.n_time_bins = n_time_bins
        self.frame_size = frame_size
        self.augment = augment
        self.cache = FrameCache(cache_dir, self.framing_params()) if cache_dir is not None else None

    def framing_params(self) -> dict:
        """Everything that decides a recording's frames besides its events: the cache key."""
        sensor = self.source.sensor_size
        resize = f"bilinear, antialias, torch {torch.__version__}" if self.frame_size is not None else None
        return {
            "method": "tonic.transforms.ToFrame(n_time_bins)",
            "n_time_bins": int(self.n_time_bins),
            "sensor_size": list(sensor) if sensor is not None else "per-recording extent",
            "frame_size": self.frame_size,
            # torch's interpolation makes the resized values: another torch version, another key.
            "resize": resize,
        }

    def _fits(self, shape: tuple[int, ...]) -> bool:
        sensor = self.source.sensor_size
        polarities = sensor[2] if sensor is not None else 2
        if shape[:2] != (self.n_time_bins, polarities):
            return False
        if self.frame_size is not None:
            return shape[2:] == (self.frame_size, self.frame_size)
        return sensor is None or shape[2:] == (sensor[1], sensor[0])

    def frames(self, index: int) -> torch.Tensor:
        """The (resized, not augmented) frames of recording ``index`` of the source."""

        def compute() -> torch.Tensor:
            frames = events_to_frames(self.source.events(index), self.n_time_bins, self.source.sensor_size)
            if self.frame_size is not None:
                frames = resize_frames(frames, self.frame_size)
            return frames

        if self.cache is None:
            return compute()
        return self.cache.get(self.source.identity(index), compute, self._fits)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        index = int(self.indices[item])
        frames = self.frames(index)
        if self.augment is not None:
            frames = self.augment(frames)
        return frames, int(self.source.labels[index])
