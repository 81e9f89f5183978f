"""The disk cache of event frames (spikecore.data.frame_cache): cached frames equal freshly binned ones bit
for bit, the framing parameters and the recording's identity key the cache, a later epoch neither reads nor
bins a recording, corrupt entries are rebuilt, and the cache can be turned off."""

import os
import warnings
import zlib

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from test_data import write_gesture_sample

from spikecore.data import DVSGestureDataModule, EventDigitsDataModule
from spikecore.data import events as events_module
from spikecore.data.events import EventArrays, EventFiles, EventFramesDataset, events_to_frames
from spikecore.data.saccade_events import SaccadeSensor, simulate_saccade_events

SENSOR = SaccadeSensor()  # 34x34, the generated event digits' sensor
N = 6


def read_events_npy(path: str) -> np.ndarray:
    """A recording saved as a structured (x, y, t, p) array: no pickle involved."""
    return np.load(path, allow_pickle=False)


@pytest.fixture(scope="module")
def recordings():
    """Six generated event digits (the project's saccade simulator), as in-memory events."""
    events, offsets = simulate_saccade_events(load_digits().images[:N] / 16.0, SENSOR, seed=0)
    return [events[offsets[i] : offsets[i + 1]] for i in range(N)]


@pytest.fixture
def files(tmp_path, recordings):
    """The recordings as one file each, served by an EventFiles source."""
    paths = []
    for i, rec in enumerate(recordings):
        path = tmp_path / "recordings" / f"{i}.npy"
        path.parent.mkdir(exist_ok=True)
        np.save(path, rec, allow_pickle=False)
        paths.append(str(path))
    return EventFiles(paths, np.arange(N) % 10, read_events_npy, SENSOR.tonic_sensor_size)


def fresh(source, T, frame_size=None):
    """Frames binned from the events, with no cache at all."""
    return [EventFramesDataset(source, np.arange(N), T, frame_size)[i][0] for i in range(N)]


@pytest.fixture
def counted(monkeypatch):
    """Counts calls of the framing function (as the dataset looks it up) and of the reader."""
    calls = {"frames": 0, "reads": 0}

    def framing(*args, **kwargs):
        calls["frames"] += 1
        return events_to_frames(*args, **kwargs)

    monkeypatch.setattr(events_module, "events_to_frames", framing)
    return calls


def counting_reader(calls):
    def read(path):
        calls["reads"] += 1
        return read_events_npy(path)

    return read


def entries(cache_dir):
    return sorted(cache_dir.glob("frames-*/*.npz"))


# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frame_size", [None, 16])  # event counts (stored as integers) and resized floats
def test_cached_frames_equal_fresh_frames_bit_for_bit(tmp_path, files, frame_size):
    expected = fresh(files, 5, frame_size)
    ds = EventFramesDataset(files, np.arange(N), 5, frame_size, cache_dir=tmp_path / "cache")
    for epoch in range(2):
        for i in range(N):
            frames, label = ds[i]
            assert frames.dtype == torch.float32 and label == i % 10
            assert torch.equal(frames, expected[i]), (epoch, i)
            assert frames.abs().sum() > 0
    assert (ds.cache.misses, ds.cache.hits, ds.cache.rebuilt) == (N, N, 0)
    assert len(entries(tmp_path / "cache")) == N


def test_second_epoch_neither_bins_nor_reads(tmp_path, files, counted):
    files.reader = counting_reader(counted)
    ds = EventFramesDataset(files, np.arange(N), 5, cache_dir=tmp_path / "cache")
    first = [ds[i][0] for i in range(N)]
    assert counted == {"frames": N, "reads": N}
    second = [ds[i][0] for i in range(N)]
    assert counted == {"frames": N, "reads": N}  # no new call: everything came from the cache
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    # A new dataset (a later run) with the same parameters finds the same entries.
    again = EventFramesDataset(files, np.arange(N), 5, cache_dir=tmp_path / "cache")
    assert torch.equal(again[3][0], first[3]) and counted == {"frames": N, "reads": N}


def test_augmentation_runs_on_every_epoch(tmp_path, files):
    flips = []

    def augment(frames):
        flips.append(1)
        return frames.flip(-1)

    ds = EventFramesDataset(files, np.arange(N), 5, augment=augment, cache_dir=tmp_path / "cache")
    expected = fresh(files, 5)
    for _ in range(2):
        assert torch.equal(ds[2][0], expected[2].flip(-1))
    assert len(flips) == 2


def test_framing_parameters_and_the_file_key_the_cache(tmp_path, files, counted):
    cache = tmp_path / "cache"
    base = EventFramesDataset(files, np.arange(N), 5, cache_dir=cache)
    base[0]
    # Another T or frame size: another folder, binned afresh (never the T=5 frames).
    for T, size in [(6, None), (5, 16)]:
        before = counted["frames"]
        ds = EventFramesDataset(files, np.arange(N), T, size, cache_dir=cache)
        assert ds.cache.dir != base.cache.dir
        frames = ds[0][0]
        assert counted["frames"] == before + 1
        assert torch.equal(frames, fresh(files, T, size)[0])
        assert frames.shape[0] == T
    assert len({p.parent for p in entries(cache)}) == 3
    # Each folder says which parameters made it.
    params = (base.cache.dir / "params.json").read_text()
    assert '"n_time_bins": 5' in params and '"sensor_size": [34, 34, 2]' in params

    # A changed recording (new content, size and time) is binned again, not served stale.
    before = counted["frames"]
    rec = read_events_npy(files.paths[0])[: len(read_events_npy(files.paths[0])) // 2]
    np.save(files.paths[0], rec, allow_pickle=False)
    os.utime(files.paths[0], ns=(1, 1))
    frames = base[0][0]
    assert counted["frames"] == before + 1
    assert torch.equal(frames, fresh(files, 5)[0])


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "wrong-shape"])
def test_corrupt_entry_is_rebuilt(tmp_path, files, counted, damage):
    cache = tmp_path / "cache"
    ds = EventFramesDataset(files, np.arange(N), 5, cache_dir=cache)
    expected = ds[1][0]
    path = ds.cache.entry(files.identity(1))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "garbage":
        path.write_bytes(b"not an npz file at all")
    else:  # a well-formed entry whose frames do not fit the parameters
        with open(path, "wb") as f:
            frames = np.zeros((3, 2, 34, 34), np.uint8)
            np.savez_compressed(f, frames=frames, crc=np.uint32(zlib.crc32(frames.tobytes())))
    before = counted["frames"]
    with pytest.warns(UserWarning, match="rebuilding"):
        frames = EventFramesDataset(files, np.arange(N), 5, cache_dir=cache)[1][0]
    assert torch.equal(frames, expected) and counted["frames"] == before + 1
    # The entry was rewritten: the next read is a clean hit.
    again = EventFramesDataset(files, np.arange(N), 5, cache_dir=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(again[1][0], expected)
    assert counted["frames"] == before + 1 and again.cache.hits == 1


def test_unwritable_cache_dir_falls_back_to_binning(tmp_path, files):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    ds = EventFramesDataset(files, np.arange(N), 5, cache_dir=blocker / "cache")
    with pytest.warns(UserWarning, match="cannot be written"):
        frames = ds[0][0]
    assert torch.equal(frames, fresh(files, 5)[0])
    with warnings.catch_warnings():  # reported once
        warnings.simplefilter("error")
        ds[1]


def test_in_memory_events_are_keyed_by_their_content(tmp_path, recordings, counted):
    all_events = np.concatenate(recordings)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in recordings])])
    source = EventArrays(all_events, offsets, np.arange(N), SENSOR.tonic_sensor_size)
    assert len({source.identity(i) for i in range(N)}) == N
    ds = EventFramesDataset(source, np.arange(N), 4, cache_dir=tmp_path / "cache")
    first = [ds[i][0] for i in range(N)]
    assert counted["frames"] == N
    assert all(torch.equal(ds[i][0], first[i]) for i in range(N)) and counted["frames"] == N
    # Other events at the same index: another entry.
    shifted = all_events.copy()
    shifted["t"] += 1
    other = EventArrays(shifted, offsets, np.arange(N), SENSOR.tonic_sensor_size)
    assert other.identity(0) != source.identity(0)


def test_data_modules_cache_under_root_unless_turned_off(tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "DVSGesture"
    for label in range(3):
        write_gesture_sample(base / "ibmGestureTrain" / "user01_led" / f"{label}.npy", rng, 200)
        write_gesture_sample(base / "ibmGestureTest" / "user24_led" / f"{label}.npy", rng, 200)

    dm = DVSGestureDataModule(root=str(tmp_path), batch_size=2, num_workers=0, T=4, max_shift=0)
    dm.setup("fit")
    x = torch.stack([dm.test_set[i][0] for i in range(3)])
    assert len(entries(tmp_path / "frame_cache")) == 3

    off = DVSGestureDataModule(
        root=str(tmp_path / "copy"), batch_size=2, num_workers=0, T=4, cache_frames=False
    )
    assert off.cache_dir is None
    custom = DVSGestureDataModule(root=str(tmp_path), T=4, cache_dir=str(tmp_path / "elsewhere"))
    custom.setup("fit")
    assert torch.equal(torch.stack([custom.test_set[i][0] for i in range(3)]), x)
    assert len(entries(tmp_path / "elsewhere")) == 3

    # The generated event digits write nothing unless asked to.
    assert EventDigitsDataModule(root=str(tmp_path / "digits")).cache_dir is None
    assert not (tmp_path / "digits").exists()
