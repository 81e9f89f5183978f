"""Reading CIFAR-10/100 from torchvision's on-disk layouts (python pickles through the restricted
unpickler, or the binary version) into ``[N, 32, 32, 3]`` uint8 arrays."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetNotFoundError, missing_dataset_message
from .safe_pickle import load_restricted

IMAGE_BYTES = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """File names of one CIFAR variant, in both of its published formats."""

    name: str
    num_classes: int
    python_dir: str
    python_train: tuple[str, ...]
    python_test: str
    label_key: str
    binary_dir: str
    binary_train: tuple[str, ...]
    binary_test: str
    # Bytes before the image in a binary record; the label used is the last of them (fine label).
    binary_label_bytes: int

    def describe(self, root: str) -> str:
        py = Path(root, self.python_dir)
        bn = Path(root, self.binary_dir)
        return (
            f"  {py}/{{{', '.join(self.python_train)}, {self.python_test}}}   (python pickles)\n"
            f"  or {bn}/{{{', '.join(self.binary_train)}, {self.binary_test}}}   (binary version)"
        )


CIFAR10 = CifarLayout(
    name="CIFAR-10",
    num_classes=10,
    python_dir="cifar-10-batches-py",
    python_train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    python_test="test_batch",
    label_key="labels",
    binary_dir="cifar-10-batches-bin",
    binary_train=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    binary_test="test_batch.bin",
    binary_label_bytes=1,
)
CIFAR100 = CifarLayout(
    name="CIFAR-100",
    num_classes=100,
    python_dir="cifar-100-python",
    python_train=("train",),
    python_test="test",
    label_key="fine_labels",
    binary_dir="cifar-100-binary",
    binary_train=("train.bin",),
    binary_test="test.bin",
    binary_label_bytes=2,
)


def find_cifar_files(layout: CifarLayout, root: str, train: bool) -> tuple[str, list[Path]] | None:
    """``("python" | "binary", files)`` for the first complete format under ``root``, else None."""
    for fmt, directory, names in (
        ("python", layout.python_dir, layout.python_train if train else (layout.python_test,)),
        ("binary", layout.binary_dir, layout.binary_train if train else (layout.binary_test,)),
    ):
        files = [Path(root, directory, n) for n in names]
        if all(f.is_file() for f in files):
            return fmt, files
    return None


def require_cifar(layout: CifarLayout, root: str) -> None:
    """Raise one :class:`DatasetNotFoundError` naming the layouts when a split's files are missing."""
    for train in (True, False):
        if find_cifar_files(layout, root, train) is None:
            problem = f"no complete {'training' if train else 'test'} files"
            raise DatasetNotFoundError(
                missing_dataset_message(layout.name, root, layout.describe(root), problem)
            )


def read_cifar(layout: CifarLayout, root: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 32, 32, 3] uint8, labels [N] int64)`` of one split."""
    found = find_cifar_files(layout, root, train)
    if found is None:
        require_cifar(layout, root)
        raise AssertionError("unreachable: require_cifar raises for a missing split")
    fmt, files = found
    reader = _read_python_batch if fmt == "python" else _read_binary_batch
    parts = [reader(layout, f) for f in files]
    rows = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise ValueError(f"{layout.name} labels outside [0, {layout.num_classes}) in {files}")
    # Rows are channel-planar (1024 R, 1024 G, 1024 B, each row-major 32x32).
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _read_python_batch(layout: CifarLayout, path: Path) -> tuple[np.ndarray, np.ndarray]:
    entry = load_restricted(path)
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR batch (a dict), got {type(entry).__name__}")
    # Python 2 originals decode to str keys; batches re-written by Python 3 may have bytes keys.
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or layout.label_key not in entry:
        raise ValueError(f"{path} lacks the 'data' and {layout.label_key!r} entries of a CIFAR batch")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[layout.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES or len(data) != len(labels):
        raise ValueError(
            f"{path}: expected uint8 data [N, {IMAGE_BYTES}] and N labels, "
            f"got {data.dtype} {data.shape} and {labels.shape}"
        )
    return data, labels


def _read_binary_batch(layout: CifarLayout, path: Path) -> tuple[np.ndarray, np.ndarray]:
    record = layout.binary_label_bytes + IMAGE_BYTES
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % record:
        raise ValueError(f"{path}: size {raw.size} is not a multiple of the {record}-byte CIFAR record")
    raw = raw.reshape(-1, record)
    return raw[:, layout.binary_label_bytes :], raw[:, layout.binary_label_bytes - 1].astype(np.int64)
