"""spikecore.data: on-disk layouts (fake, tiny, written here), the restricted unpickler, the events -> frames
path, the generated event digits and the data-module plumbing."""

import inspect
import os
import pickle
import random

import jsonargparse
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from tonic.io import events_struct

from spikecore.data import (
    CIFAR10DataModule,
    CIFAR10DVSDataModule,
    CIFAR100DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    DVSGestureDataModule,
    EventDigitsDataModule,
    ImageNetDataModule,
    NCaltech101DataModule,
    UnsafePickleError,
    events_to_frames,
    safe_pickle,
)
from spikecore.data import cifar as cifar_module
from spikecore.data import neuromorphic as neuromorphic_module
from spikecore.data.event_readers import read_dvsgesture, read_ncaltech101
from spikecore.data.saccade_events import SaccadeSensor, simulate_saccade_events
from spikecore.data.splits import stratified_split
from spikecore.data.transforms import EventFrameAugment

# Every augmentation off and identity normalisation: a served image is exactly pixels / 255.
PLAIN = dict(crop_padding=0, hflip=0.0, auto_augment=None, random_erasing=0.0, mean=(0, 0, 0), std=(1, 1, 1))


# ------------------------------------------------------------------------------------------------------------
# Fake CIFAR in torchvision's layouts
# ------------------------------------------------------------------------------------------------------------
def cifar_rows(images: np.ndarray) -> np.ndarray:
    """[N, 32, 32, 3] -> CIFAR's channel-planar rows [N, 3072] (1024 R, then G, then B)."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_fake_cifar10(root, rng, per_batch=3, n_test=4, protocol=2):
    """Python-pickle CIFAR-10 with random pixels; returns (train images, train labels, test ...)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    splits = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        batch = {
            "batch_label": name,
            "labels": labels,
            "data": cifar_rows(images),
            "filenames": ["x.png"] * n,
        }
        with open(base / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        splits[name] = (images, np.array(labels))
    train = [splits[f"data_batch_{i}"] for i in range(1, 6)]
    return (
        np.concatenate([t[0] for t in train]),
        np.concatenate([t[1] for t in train]),
        *splits["test_batch"],
    )


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_pickles_round_trip_through_the_restricted_unpickler(tmp_path, monkeypatch, protocol):
    train_x, train_y, test_x, test_y = write_fake_cifar10(
        tmp_path, np.random.default_rng(0), protocol=protocol
    )

    # Reading must never fall back to plain unpickling; record what the restricted one resolves.
    def forbidden(*args, **kwargs):
        raise AssertionError("plain pickle.load/loads used on a data file")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    resolved = []
    original = safe_pickle.RestrictedUnpickler.find_class

    def spy(self, module, name):
        resolved.append((module, name))
        return original(self, module, name)

    monkeypatch.setattr(safe_pickle.RestrictedUnpickler, "find_class", spy)

    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4, num_workers=0, **PLAIN)
    dm.prepare_data()
    dm.setup("fit")
    assert any(name in ("_reconstruct", "_frombuffer") for _, name in resolved)
    assert (dm.num_classes, dm.in_chans, dm.img_size, dm.is_sequence) == (10, 3, 32, False)
    assert len(dm.train_set) == 15 and len(dm.test_set) == 4 and dm.val_set is dm.test_set
    np.testing.assert_array_equal(dm.train_set.images, train_x)
    np.testing.assert_array_equal(dm.train_set.labels, train_y)

    # Through the whole serving path: exact pixels, CHW, in order.
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    np.testing.assert_array_equal((x * 255).round().to(torch.uint8).numpy(), test_x.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y.numpy(), test_y)


def test_cifar10_binary_layout(tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-10-batches-bin"
    base.mkdir()
    expected = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, 2, dtype=np.uint8)
        np.concatenate([labels[:, None], cifar_rows(images)], axis=1).tofile(base / name)
        expected[name] = (images, labels)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=2, num_workers=0, **PLAIN)
    dm.setup("fit")
    np.testing.assert_array_equal(dm.test_set.images, expected["test_batch.bin"][0])
    np.testing.assert_array_equal(dm.test_set.labels, expected["test_batch.bin"][1])
    np.testing.assert_array_equal(dm.train_set.images[:2], expected["data_batch_1.bin"][0])
    np.testing.assert_array_equal(dm.train_set.labels[-2:], expected["data_batch_5.bin"][1])


def test_cifar100_python_layout_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for name, n in (("train", 5), ("test", 3)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        batch = {
            "data": cifar_rows(images),
            "fine_labels": [99, 0, 57, 3, 12][:n],
            "coarse_labels": [19, 0, 1, 2, 3][:n],
        }
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    dm = CIFAR100DataModule(root=str(tmp_path), batch_size=2, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 100
    np.testing.assert_array_equal(dm.train_set.labels, [99, 0, 57, 3, 12])
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32)


class _SystemPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload", [_SystemPayload, _ExecPayload])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, payload):
    write_fake_cifar10(tmp_path, np.random.default_rng(3), per_batch=1, n_test=1)
    marker = tmp_path / "pwned"
    # A real batch with the payload hidden inside one of its values.
    evil = {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "extra": payload(marker)}
    batch_file = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch_file.write_bytes(pickle.dumps(evil, protocol=2))

    dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0)
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle .*data_batch_3.*(system|exec)"):
        dm.setup("fit")
    assert not marker.exists()

    # The payload is live: plain unpickling of the same file does run it.
    with open(batch_file, "rb") as f:
        pickle.load(f)
    assert marker.exists()


# ------------------------------------------------------------------------------------------------------------
# Missing data: one clear error, nothing fetched or created
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "fragments"),
    [
        (CIFAR10DataModule, ["cifar-10-batches-py", "cifar-10-batches-bin", "download: true"]),
        (CIFAR100DataModule, ["cifar-100-python", "download: true"]),
        (CIFAR10DVSDataModule, ["CIFAR10DVS/{airplane", ".aedat4", "download: true"]),
        (
            DVSGestureDataModule,
            ["DVSGesture/ibmGestureTrain/user<NN>_<lighting>/<label>.npy", "download: true"],
        ),
        (NCaltech101DataModule, ["NCALTECH101/Caltech101/<class>/*.bin", "download: true"]),
        (ImageNetDataModule, ["train/<class>/*.JPEG", "val/<class>/*.JPEG", "cannot be downloaded"]),
    ],
)
def test_missing_dataset_is_one_clear_error(tmp_path, module, fragments):
    root = tmp_path / "data"
    root.mkdir()
    dm = module(root=str(root), num_workers=0)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as info:
            step()
        message = str(info.value)
        assert str(root) in message
        for fragment in fragments:
            assert fragment in message
    assert list(root.iterdir()) == []  # no download started, no folders made


def test_download_happens_in_prepare_data_only(tmp_path, monkeypatch):
    # Stand-ins for torchvision's and tonic's fetchers (no network here): record calls, write a fake set.
    calls = []

    def fake_torchvision_download(url, root, filename, md5):
        calls.append(("cifar10", url, filename, md5))
        write_fake_cifar10(tmp_path / "cifar", np.random.default_rng(8), per_batch=1, n_test=1)

    class FakeTonicGesture:
        def __init__(self, save_to, train=True):
            calls.append(("gesture", train))
            split = "ibmGestureTrain" if train else "ibmGestureTest"
            path = tmp_path / "dvs" / "DVSGesture" / split / "user01_led" / "3.npy"
            write_gesture_sample(path, np.random.default_rng(9), 20)

    monkeypatch.setattr(cifar_module, "download_and_extract_archive", fake_torchvision_download)
    monkeypatch.setattr(neuromorphic_module, "DVSGesture", FakeTonicGesture)

    cifar = CIFAR10DataModule(root=str(tmp_path / "cifar"), download=True, num_workers=0)
    gesture = DVSGestureDataModule(root=str(tmp_path / "dvs"), download=True, num_workers=0)
    for dm in (cifar, gesture):
        with pytest.raises(DatasetNotFoundError):
            dm.setup("fit")  # setup() on every rank only reads: nothing fetched there
    assert calls == []

    cifar.prepare_data()
    gesture.prepare_data()
    assert calls == [
        (
            "cifar10",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
        ),
        ("gesture", True),
        ("gesture", False),
    ]
    cifar.prepare_data()
    gesture.prepare_data()
    assert len(calls) == 3  # present now: not fetched again
    cifar.setup("fit")
    gesture.setup("fit")
    assert len(cifar.train_set) == 5 and len(gesture.train_set) == 1 and len(gesture.test_set) == 1


def test_incomplete_cifar_names_the_missing_split(tmp_path):
    write_fake_cifar10(tmp_path, np.random.default_rng(4), per_batch=1, n_test=1)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DatasetNotFoundError, match="no complete test files"):
        CIFAR10DataModule(root=str(tmp_path)).setup("fit")


# ------------------------------------------------------------------------------------------------------------
# ImageNet layout
# ------------------------------------------------------------------------------------------------------------
def test_tiny_imagefolder(tmp_path):
    colors = {"n01_cat": (200, 40, 40), "n02_dog": (30, 160, 220)}
    for split in ("train", "val"):
        for cls, color in colors.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (48, 40), color).save(tmp_path / split / cls / f"{i}.JPEG", quality=100)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    dm = ImageNetDataModule(
        root=str(tmp_path), batch_size=2, num_workers=0, img_size=32, num_classes=2, mean=mean, std=std
    )
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and set(y.tolist()) <= {0, 1}

    # Evaluation: resize + centre crop of a solid image stays that colour, then normalised.
    x, y = next(iter(dm.val_dataloader()))
    assert y.tolist() == [0, 0]
    expected = (torch.tensor(colors["n01_cat"]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(x.mean((0, 2, 3)), expected, atol=0.03, rtol=0)

    with pytest.raises(ValueError, match="num_classes=1000 but 2 class folders"):
        ImageNetDataModule(root=str(tmp_path), num_workers=0).setup("fit")


# ------------------------------------------------------------------------------------------------------------
# Events -> frames (shared by every event set)
# ------------------------------------------------------------------------------------------------------------
def random_events(rng, n, width, height, duration):
    events = np.empty(n, dtype=events_struct)
    events["x"] = rng.integers(0, width, n)
    events["y"] = rng.integers(0, height, n)
    events["t"] = np.sort(rng.integers(0, duration, n))
    events["p"] = rng.integers(0, 2, n).astype(bool)
    return events


def numpy_frames(events, n_bins, width, height):
    """Independent reference for ToFrame(n_time_bins): equal time bins of (t_last - t0) // n_bins, counting
    events with bin < n_bins (so events in the final partial bin are left out, as tonic does)."""
    t = events["t"].astype(np.int64)
    width_us = (t.max() - t.min()) // n_bins
    bins = (t - t.min()) // width_us
    keep = bins < n_bins
    hist = np.zeros((n_bins, 2, height, width))
    np.add.at(hist, (bins[keep], events["p"][keep].astype(int), events["y"][keep], events["x"][keep]), 1)
    return hist


def test_events_to_frames_matches_a_numpy_histogram():
    rng = np.random.default_rng(5)
    events = random_events(rng, 5000, width=20, height=12, duration=1_000_003)
    frames = events_to_frames(events, n_time_bins=7, sensor_size=(20, 12, 2))
    assert frames.shape == (7, 2, 12, 20) and frames.dtype == torch.float32
    np.testing.assert_array_equal(frames.numpy(), numpy_frames(events, 7, 20, 12))
    # Unsorted input gives the same frames (tonic alone would silently drop events).
    shuffled = events[rng.permutation(len(events))]
    torch.testing.assert_close(events_to_frames(shuffled, 7, (20, 12, 2)), frames)
    # Empty recordings keep the [T, P, H, W] shape even on a non-square sensor.
    assert events_to_frames(events[:0], 4, (20, 12, 2)).shape == (4, 2, 12, 20)


def write_gesture_sample(path, rng, n):
    """One DVS Gesture .npy as tonic ships it: [N, 4] (x, y, p, t in ms)."""
    t_ms = np.sort(rng.integers(0, 6000, n))
    raw = np.stack([rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n), t_ms], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, raw)
    return raw


def test_dvs_gesture_fake_layout(tmp_path):
    rng = np.random.default_rng(6)
    base = tmp_path / "DVSGesture"
    for label in range(11):
        write_gesture_sample(base / "ibmGestureTrain" / "user01_fluorescent" / f"{label}.npy", rng, 300)
    test_raw = {
        label: write_gesture_sample(base / "ibmGestureTest" / "user24_led" / f"{label}.npy", rng, 400)
        for label in (2, 5)
    }
    dm = DVSGestureDataModule(root=str(tmp_path), batch_size=4, num_workers=0, T=5)
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.num_classes, dm.in_chans, dm.img_size, dm.T, dm.is_sequence) == (11, 2, 128, 5, True)
    assert len(dm.train_set) == 11 and len(dm.test_set) == 2

    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (2, 5, 2, 128, 128) and y.tolist() == [2, 5]
    for frames, label in zip(x, y.tolist(), strict=True):
        raw = test_raw[label]
        events = np.zeros(len(raw), dtype=events_struct)
        events["x"], events["y"], events["p"], events["t"] = raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3] * 1000
        np.testing.assert_array_equal(frames.numpy(), numpy_frames(events, 5, 128, 128))

    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 5, 2, 128, 128)


def test_dvs_gesture_reader_never_unpickles(tmp_path):
    path = tmp_path / "0.npy"
    np.save(path, np.array([[1, 2, 0, {"not": "events"}]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        read_dvsgesture(str(path))


def write_mnist_bin(path, x, y, p, t):
    """N-MNIST/N-Caltech101 binary records: x, y, then p in bit 7 and a 23-bit timestamp."""
    rec = np.stack([x, y, (p << 7) | ((t >> 16) & 127), (t >> 8) & 255, t & 255], axis=1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec.tofile(path)


def test_ncaltech101_fake_layout(tmp_path):
    rng = np.random.default_rng(7)
    base = tmp_path / "NCALTECH101" / "Caltech101"
    written = {}
    for c in range(101):
        for i in range(2):
            n = 50
            x, y = rng.integers(3, 60, n), rng.integers(5, 40, n)
            p, t = rng.integers(0, 2, n), np.sort(rng.integers(0, 300_000, n))
            path = base / f"class_{c:03d}" / f"image_{i:04d}.bin"
            write_mnist_bin(path, x, y, p, t)
            written[str(path)] = (x, y, p, t)
    write_mnist_bin(base / "BACKGROUND_Google" / "image_0001.bin", *[np.zeros(3, int)] * 4)

    path, (x, y, p, t) = next(iter(written.items()))
    events = read_ncaltech101(path)
    np.testing.assert_array_equal(events["x"], x - x.min())
    np.testing.assert_array_equal(events["y"], y - y.min())
    np.testing.assert_array_equal(events["t"], t)
    np.testing.assert_array_equal(events["p"], p)

    dm = NCaltech101DataModule(
        root=str(tmp_path), batch_size=8, num_workers=0, T=4, frame_size=32, val_split=0.5
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 101 and dm.img_size == 32
    # One recording of every class on each side of the 1:1 split; background excluded.
    for dataset in (dm.train_set, dm.test_set):
        assert sorted(dataset.source.labels[dataset.indices].tolist()) == list(range(101))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 4, 2, 32, 32) and x.sum() > 0 and 0 <= y.min() and y.max() < 101

    # A folder short of 101 classes is malformed.
    (base / "class_000" / "image_0000.bin").unlink()
    (base / "class_000" / "image_0001.bin").unlink()
    (base / "class_000").rmdir()
    with pytest.raises(DatasetNotFoundError, match="100 class folders"):
        NCaltech101DataModule(root=str(tmp_path), num_workers=0).setup("fit")


# ------------------------------------------------------------------------------------------------------------
# Generated event digits
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def event_digits():
    dm = EventDigitsDataModule(batch_size=32, num_workers=0, T=6, hflip=0.0, max_shift=0, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_event_digits_are_valid_tonic_events(event_digits):
    source = event_digits.source
    events, offsets = source.all_events, source.offsets
    assert events.dtype.names == ("x", "y", "t", "p") and len(offsets) == 1797 + 1
    assert events["x"].min() >= 0 and events["x"].max() < 34
    assert events["y"].min() >= 0 and events["y"].max() < 34
    assert events["t"].min() >= 0 and events["t"].max() < 300_000
    counts = np.diff(offsets)
    assert counts.min() > 100
    for i in range(0, 1797, 97):
        sample = source.events(i)
        assert np.all(np.diff(sample["t"]) >= 0)
        assert 0.2 < sample["p"].mean() < 0.8  # both polarities, in comparable numbers


def test_event_digits_polarity_follows_the_motion():
    # A bright square on black: moving down, its lower edge brightens (ON) and its upper edge darkens (OFF);
    # moving left (the third saccade), its left edge brightens.
    square = np.zeros((1, 20, 20))
    square[0, 6:14, 6:14] = 1
    sensor = SaccadeSensor(sensor_size=34, image_size=20, amplitude=6.0, amplitude_jitter=0.0)
    events, _ = simulate_saccade_events(square, sensor, seed=0)
    first = events[events["t"] < sensor.saccade_us]
    last = events[events["t"] >= 2 * sensor.saccade_us]
    assert first["y"][first["p"]].mean() > first["y"][~first["p"]].mean() + 2
    assert last["x"][last["p"]].mean() < last["x"][~last["p"]].mean() - 2


def test_event_digits_are_deterministic_by_seed(event_digits):
    again = EventDigitsDataModule(T=6, seed=0).generate()
    np.testing.assert_array_equal(again.all_events, event_digits.source.all_events)
    np.testing.assert_array_equal(again.offsets, event_digits.source.offsets)
    images = load_digits().images[:40] / 16
    a, _ = simulate_saccade_events(images, SaccadeSensor(), seed=0)
    b, _ = simulate_saccade_events(images, SaccadeSensor(), seed=1)
    assert len(a) != len(b) or not np.array_equal(a, b)


def test_event_digits_frames_and_class_signal(event_digits):
    dm = event_digits
    assert (dm.num_classes, dm.in_chans, dm.img_size, dm.T, dm.is_sequence) == (10, 2, 34, 6, True)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 6, 2, 34, 34) and x.dtype == torch.float32
    assert 0 <= y.min() and y.max() < 10

    def spatial_maps(dataset):
        maps = np.stack([dataset[i][0].sum((0, 1)).flatten().numpy() for i in range(len(dataset))])
        return maps / np.linalg.norm(maps, axis=1, keepdims=True), dataset.source.labels[dataset.indices]

    train_maps, train_labels = spatial_maps(dm.train_set)
    test_maps, test_labels = spatial_maps(dm.test_set)
    centroids = np.stack([train_maps[train_labels == c].mean(0) for c in range(10)])
    predicted = np.argmax(test_maps @ centroids.T, axis=1)
    assert (predicted == test_labels).mean() > 0.5  # chance is 0.1


# ------------------------------------------------------------------------------------------------------------
# Embedded digits through the CIFAR recipe
# ------------------------------------------------------------------------------------------------------------
def test_digits_batches_and_splits():
    dm = DigitsDataModule(batch_size=16, num_workers=0, img_size=24, val_split=0.1, test_split=0.2, seed=3)
    dm.setup("fit")
    assert (dm.num_classes, dm.in_chans, dm.img_size, dm.is_sequence) == (10, 3, 24, False)
    parts = [dm.train_set.indices, dm.val_set.indices, dm.test_set.indices]
    assert sum(map(len, parts)) == 1797 and len(np.unique(np.concatenate(parts))) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 24, 24) and 0 <= y.min() and y.max() < 10

    # Served images are the scikit-learn digits: averaging 3x3 blocks gives back the 8x8 originals.
    plain = DigitsDataModule(num_workers=0, img_size=24, seed=3, **PLAIN)
    plain.setup("test")
    digits = load_digits()
    for i in plain.test_set.indices[:20]:
        image, label = plain.test_set[int(np.flatnonzero(plain.test_set.indices == i)[0])]
        assert label == digits.target[i]
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        pooled = image[0].reshape(8, 3, 8, 3).mean((1, 3)).numpy()
        assert np.corrcoef(pooled.ravel(), digits.images[i].ravel())[0, 1] > 0.95


def test_digits_train_transform_is_the_cifar_recipe():
    plain = DigitsDataModule(num_workers=0, seed=0, **PLAIN)
    plain.setup("fit")
    reference = plain.val_set[0][0]

    flipped = DigitsDataModule(num_workers=0, seed=0, **{**PLAIN, "hflip": 1.0})
    flipped.setup("fit")
    flipped.train_set.indices = plain.val_set.indices  # same image, training transform
    torch.testing.assert_close(flipped.train_set[0][0], reference.flip(-1))

    erased = DigitsDataModule(num_workers=0, seed=0, **{**PLAIN, "random_erasing": 1.0})
    erased.setup("fit")
    erased.train_set.indices = plain.val_set.indices
    random.seed(0)
    changed = (erased.train_set[0][0] != reference).any(0)
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    # One erased rectangle: every pixel in the bounding box of the changed pixels changed.
    assert changed.sum() > 0 and changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()

    recipe = DigitsDataModule(
        num_workers=0, auto_augment="rand-m9-n1-mstd0.4-inc1", random_erasing=0.25, crop_padding=4
    )
    recipe.setup("fit")
    steps = recipe.train_set.transform.transforms
    assert any(isinstance(s, RandAugment) for s in steps) and isinstance(steps[-1], RandomErasing)
    assert recipe.train_set[0][0].shape == (3, 32, 32)


def test_event_frame_augment_flips_and_rolls_all_time_steps_alike():
    frames = torch.rand(4, 2, 10, 12)
    torch.testing.assert_close(EventFrameAugment(hflip=1.0, max_shift=0)(frames), frames.flip(-1))
    torch.manual_seed(0)
    rolled = EventFrameAugment(hflip=0.0, max_shift=3)(frames)
    matches = [
        (dy, dx)
        for dy in range(-3, 4)
        for dx in range(-3, 4)
        if torch.equal(rolled, frames.roll((dy, dx), dims=(-2, -1)))
    ]
    assert len(matches) == 1


# ------------------------------------------------------------------------------------------------------------
# Plumbing: splits, loaders, registry, LightningCLI signatures
# ------------------------------------------------------------------------------------------------------------
def test_stratified_split_is_per_class_and_deterministic():
    labels = np.repeat(np.arange(10), 50)
    train, test = stratified_split(labels, [0.1], seed=4)
    assert np.bincount(labels[test]).tolist() == [5] * 10  # 9:1 within every class
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 500
    again = stratified_split(labels, [0.1], seed=4)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(stratified_split(labels, [0.1], seed=5)[1], test)


def test_dataloader_policy():
    dm = DigitsDataModule(batch_size=8, num_workers=2)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.drop_last and not val.drop_last
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler)
    assert train.persistent_workers and train.num_workers == 2
    assert train.pin_memory == torch.cuda.is_available()
    single = DigitsDataModule(num_workers=0)
    single.setup("fit")
    assert not single.train_dataloader().persistent_workers


DATA_MODULES = (  # every data module spikecore ships (configs name them by class_path)
    CIFAR10DataModule,
    CIFAR100DataModule,
    ImageNetDataModule,
    CIFAR10DVSDataModule,
    DVSGestureDataModule,
    NCaltech101DataModule,
    DigitsDataModule,
    EventDigitsDataModule,
)


def test_every_data_module_is_listed():
    import spikecore.data as data

    shipped = {v for v in vars(data).values() if isinstance(v, type) and issubclass(v, data.BaseDataModule)}
    assert shipped - {data.BaseDataModule} == set(DATA_MODULES)


@pytest.mark.parametrize("cls", DATA_MODULES, ids=lambda c: c.__name__)
def test_constructor_is_lightningcli_friendly(cls):
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    assert {"root", "batch_size", "num_workers", "download"} <= {p.name for p in params}
    for p in params:
        assert p.annotation is not inspect.Parameter.empty and not isinstance(p.annotation, str), p.name
        assert p.default is not inspect.Parameter.empty, p.name
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(cls, "data")
    config = parser.parse_args(["--data.batch_size=7", "--data.root=/somewhere"])
    dm = cls(**vars(config.data))
    assert dm.batch_size == 7 and dm.root == "/somewhere"
    assert isinstance(dm.num_classes, int) and dm.in_chans in (2, 3) and isinstance(dm.img_size, int)
    assert dm.is_sequence == (dm.in_chans == 2) and (not dm.is_sequence or dm.T >= 1)
