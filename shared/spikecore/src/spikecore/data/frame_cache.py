"""A disk cache of event frames, so that recordings are read and binned once, not every epoch.

One file per recording and framing: ``<cache_dir>/frames-<key>/<id>.npz``, where

- ``key`` is a digest of the framing parameters (time bins ``T``, tonic's sensor size, the frame size of
  the resize, the framing method, a format version and tonic's version), also written out in
  ``frames-<key>/params.json``: any change of them uses another folder, never a stale frame;
- ``id`` is a digest of the recording's identity: for a file, its absolute path, size and modification
  time (and the reader function), so an edited or replaced file is binned again; for in-memory events,
  a digest of the events themselves.

Entries are written atomically (a temporary file renamed into place), so concurrent data-loader workers and
interrupted runs never leave a partial entry under a real name. An entry holds the frames (integer counts
stored as ``uint8`` / ``uint16`` when exact, else ``float32``; compressed) and a CRC-32 of them; one that
cannot be read, has the wrong shape or fails its checksum is binned again and rewritten. Nothing is
pickled (``np.load(allow_pickle=False)``). Augmentation is not cached: it runs on the cached frames.

Stale entries (of changed files or parameters) are not removed; delete the folder to reclaim the space.
"""

import hashlib
import json
import os
import tempfile
import warnings
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FORMAT_VERSION", "FrameCache"]

# Part of every key: bump it whenever the framing code (events_to_frames, resize_frames) or the entry
# layout changes, so that no frame made by the old code is served.
FORMAT_VERSION = 1


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _compact(frames: np.ndarray) -> np.ndarray:
    """The frames in the smallest dtype that holds them exactly (counts), else float32 as they are."""
    if frames.size and np.all(frames >= 0) and np.array_equal(frames, np.floor(frames)):
        top = frames.max()
        if top <= np.iinfo(np.uint8).max:
            return frames.astype(np.uint8)
        if top <= np.iinfo(np.uint16).max:
            return frames.astype(np.uint16)
    return frames.astype(np.float32, copy=False)


class FrameCache:
    """Frames of recordings under ``cache_dir``, for one set of framing ``params`` (a JSON-able mapping).

    :meth:`get` returns the cached frames of a recording, or computes, stores and returns them.
    ``hits`` / ``misses`` / ``rebuilt`` count what happened (per process: each data-loader worker has its
    own copy). A cache folder that cannot be written is reported once and the frames are computed as
    without a cache.
    """

    def __init__(self, cache_dir: str | Path, params: Mapping[str, Any]) -> None:
        import tonic

        self.params = {"format": FORMAT_VERSION, "tonic": tonic.__version__, **params}
        text = json.dumps(self.params, sort_keys=True)
        self.root = Path(cache_dir).expanduser()
        self.dir = self.root / f"frames-{_digest(text, 16)}"
        self.hits = self.misses = self.rebuilt = 0
        self._writable = True
        self._params_text = text

    def entry(self, identity: str) -> Path:
        return self.dir / f"{_digest(identity, 32)}.npz"

    def load(
        self, identity: str, check: Callable[[tuple[int, ...]], bool] | None = None
    ) -> torch.Tensor | None:
        """The cached frames of ``identity``; ``None`` when absent or unusable (then counted as rebuilt)."""
        path = self.entry(identity)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                frames, crc = npz["frames"], int(npz["crc"])
            if frames.dtype not in (np.uint8, np.uint16, np.float32) or frames.ndim != 4:
                raise ValueError(f"unexpected frames {frames.dtype} {frames.shape}")
            if zlib.crc32(np.ascontiguousarray(frames).tobytes()) != crc:
                raise ValueError("checksum mismatch")
            if check is not None and not check(tuple(frames.shape)):
                raise ValueError(f"frames of shape {frames.shape} do not fit the framing parameters")
        except Exception as err:  # anything wrong with an entry: bin the recording again
            warnings.warn(f"frame cache entry {path} is unusable ({err}); rebuilding it", stacklevel=2)
            self.rebuilt += 1
            return None
        return torch.from_numpy(frames.astype(np.float32, copy=False))

    def store(self, identity: str, frames: torch.Tensor) -> None:
        if not self._writable:
            return
        arr = _compact(frames.detach().cpu().numpy())
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            params_file = self.dir / "params.json"
            if not params_file.exists():
                self._atomic_write(params_file, lambda f: f.write(self._params_text.encode() + b"\n"))
            crc = np.uint32(zlib.crc32(np.ascontiguousarray(arr).tobytes()))
            self._atomic_write(self.entry(identity), lambda f: np.savez_compressed(f, frames=arr, crc=crc))
        except OSError as err:
            self._writable = False
            warnings.warn(
                f"frame cache {self.dir} cannot be written ({err.strerror or err}); frames are computed "
                "every time. Pass a writable cache_dir, or turn the cache off.",
                stacklevel=2,
            )

    def _atomic_write(self, path: Path, write: Callable[[Any], Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get(
        self,
        identity: str | None,
        compute: Callable[[], torch.Tensor],
        check: Callable[[tuple[int, ...]], bool] | None = None,
    ) -> torch.Tensor:
        """Cached frames of ``identity`` or ``compute()`` (then stored); ``identity=None`` is not cached."""
        if identity is None:
            return compute()
        frames = self.load(identity, check)
        if frames is not None:
            self.hits += 1
            return frames
        self.misses += 1
        frames = compute()
        self.store(identity, frames)
        return frames
