"""Reading tensor files that may come from anywhere, without ever running code from them.

Every checkpoint, weight file or tensor file the packages read goes through :func:`safe_torch_load`:

- local paths only: a URL is refused (nothing is downloaded at run time, and a download is the route
  by which Lightning would otherwise unpickle a file with ``weights_only=False``);
- ``torch.load(weights_only=True)``: pickled objects other than tensors and plain containers are refused,
  so a crafted file cannot execute code;
- the zip archive's CRC-32 of every member is checked first: ``torch.load`` does not, so a bit-flipped
  file would otherwise load with silently wrong values;
- a missing, empty, truncated or foreign file is one :class:`CheckpointError` that says what to do.

:func:`check_finite` refuses tensors holding NaN or infinity (weights, or an optimiser state that would
poison a resumed run).
"""

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class CheckpointError(UserError, ValueError):
    """A checkpoint or weight file that is missing, unreadable, unsafe, corrupted or does not fit."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """``TypeName: first line of the message`` (safe for exceptions with an empty message)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch's messages carry terminal colours
    line = text.splitlines()[0][:limit] if text else ""
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def is_url(path: str | Path) -> bool:
    return bool(_URL.match(str(path)))


def local_file(path: str | Path, what: str = "checkpoint") -> Path:
    """``path`` as an existing, non-empty local file; a URL, a folder or a missing file is refused."""
    if is_url(path):
        raise CheckpointError(
            f"{what} {str(path)!r} is a URL: nothing is downloaded at run time (and a downloaded file could "
            "run code). Download it yourself, check where it comes from, and pass the local path."
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{what} {p} does not exist")
    if not p.is_file():
        raise CheckpointError(f"{what} {p} is not a file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{what} {p} is empty (0 bytes): the write that made it was interrupted")
    return p


def verify_zip_crc(path: str | Path, what: str = "checkpoint") -> None:
    """Check the CRC-32 of every member of a zip-format torch file (a no-op for other formats)."""
    p = Path(path)
    if not zipfile.is_zipfile(p):
        return
    try:
        with zipfile.ZipFile(p) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{what} {p} is a damaged zip archive ({first_line(err)})") from err
    if bad is not None:
        raise CheckpointError(
            f"{what} {p} is corrupted: the checksum of its member {bad!r} does not match (a bit flipped on "
            "disk or in transfer). Use an intact copy."
        )


def safe_torch_load(
    path: str | Path, what: str = "checkpoint", map_location: str | torch.device = "cpu"
) -> Any:
    """``torch.load(path, weights_only=True)`` after the checks above; every failure is a
    :class:`CheckpointError` naming the file."""
    p = local_file(path, what)
    verify_zip_crc(p, what)
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):  # not a pickle at all: garbage or truncated
            raise CheckpointError(
                f"cannot read {what} {p}: {first_line(err)}. It is corrupted or not a torch file."
            ) from err
        # weights_only met a pickled object that is not a plain tensor
        found = re.search(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \d+", str(err))
        what_found = f" ({found.group(1) or found.group(0)})" if found else ""
        raise CheckpointError(
            f"cannot read {what} {p}: it holds pickled Python objects other than tensors{what_found}, "
            "refused for safety (loading them could run code). Use a file written by this project, or "
            "re-save the weights as a plain state dict of tensors."
        ) from err
    except Exception as err:  # truncated, or not a torch file
        raise CheckpointError(
            f"cannot read {what} {p}: {first_line(err)}. It is corrupted, truncated, or holds objects that "
            "are not plain tensors (refused for safety: loading them could run code)."
        ) from err


def _walk_tensors(obj: Any, prefix: str):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _walk_tensors(v, f"{prefix}[{i}]")


def check_finite(obj: Any, path: str | Path, what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` if any floating-point tensor in ``obj`` (nested dicts / lists) holds
    NaN or infinity, naming the first such entry and how many there are."""
    bad = []
    for name, t in _walk_tensors(obj, ""):
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{what} {path} holds NaN or infinite values in {bad[0]!r}{more}: the run that wrote it "
            "diverged. Use an earlier checkpoint."
        )


def state_dict_mismatch(
    own: Mapping[str, torch.Tensor],
    theirs: Mapping[str, torch.Tensor],
    strict: bool = True,
    extra: Mapping[str, list[str]] | None = None,
    show: int = 4,
) -> str:
    """How ``theirs`` fails to fit ``own`` (names and shapes), as ``missing [...]; unexpected [...]; other
    shapes [...]`` plus any ``extra`` groups; empty when it fits. ``strict=False`` ignores missing names
    (a module that saves only part of itself)."""
    groups = {
        "missing": [k for k in own if k not in theirs] if strict else [],
        "unexpected": [k for k in theirs if k not in own],
        "other shapes": [k for k in own if k in theirs and tuple(own[k].shape) != tuple(theirs[k].shape)],
        **(extra or {}),
    }
    return "; ".join(
        f"{name} {keys[:show]}{' ...' if len(keys) > show else ''}" for name, keys in groups.items() if keys
    )
