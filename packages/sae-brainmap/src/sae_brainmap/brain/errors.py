"""One error type for every brain-data problem, so callers can catch it and users read what is wrong."""


class BrainDataError(ValueError):
    """A brain-data file is missing, malformed, or inconsistent with the rest of the dataset."""


def require_file(path, what: str):
    """``path`` as a Path, or a BrainDataError naming ``what`` was expected there."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise BrainDataError(f"{what} not found: {p} (no such file)")
    return p
