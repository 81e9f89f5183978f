"""One error type for every brain-data problem, so callers can catch it and users read what is wrong."""

from contextlib import contextmanager

from spikecore.errors import UserError


class BrainDataError(UserError, ValueError):
    """A brain-data file is missing, malformed, or inconsistent with the rest of the dataset."""


class BrainDataWarning(UserWarning):
    """Brain data that can be used, but not all of it (e.g. constant voxels left out)."""


def require_file(path, what: str):
    """``path`` as a Path, or a BrainDataError naming ``what`` was expected there."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise BrainDataError(f"{what} not found: {p} (no such file)")
    return p


def reason(err: BaseException) -> str:
    """``err`` on one line: its type and message."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@contextmanager
def reading(path, what: str, error: type[BrainDataError] = BrainDataError, fix: str = "download it again"):
    """Inside the block, any failure of a third-party reader (h5py, nibabel, scipy.io, PIL) on ``path``
    becomes one ``error`` naming the file, what it is, why and how to fix it, instead of the reader's
    own traceback. A BrainDataError raised inside passes through unchanged; so does MemoryError (not the
    file's fault). Keep the block to the reader's calls, so that a bug of ours is not blamed on the file."""
    try:
        yield
    except (BrainDataError, MemoryError):
        raise
    except Exception as err:
        raise error(
            f"{what} {path} cannot be read ({reason(err)}): the file is truncated, corrupted or not in "
            f"the expected format; {fix}"
        ) from None
