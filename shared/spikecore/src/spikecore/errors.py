"""The errors a user causes and can fix: the console scripts print each as one line and exit with status 2.

Library code raises a subclass of :class:`UserError` (also a ``ValueError`` or ``OSError`` where that is
what callers would catch) for a bad file, config or path; anything else is a bug and keeps its traceback.
"""

import os
import tempfile
from pathlib import Path


class UserError(Exception):
    """Something the user can fix (a missing or unsafe file, a config value, an output folder)."""


class ConfigError(UserError, ValueError):
    """A config or argument value that cannot work; the message names the key and what is allowed."""


class OutputFolderError(UserError, OSError):
    """An output folder that cannot be written (it is a file, or read-only)."""


def writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` if needed and prove it can be written to (a probe file is made and removed), so that
    work is refused before it starts rather than lost when its results are saved."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputFolderError(f"{what} {p} is a file, not a folder: choose another path")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputFolderError(
            f"{what} {p} cannot be written ({err.strerror or type(err).__name__}): choose a writable path"
        ) from err
    return p
