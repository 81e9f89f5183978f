"""A restricted unpickler for data files that are pickles (CIFAR's python batches).

Plain ``pickle.load`` runs whatever callable a file names, so a tampered data file is arbitrary code.
This unpickler resolves only the globals a CIFAR batch needs (numpy array and dtype reconstruction,
``_codecs.encode`` for bytes in protocol-2 pickles, plain containers) and refuses any other global
before it is looked up, so nothing outside that list is ever imported or called.
"""

import io
import pickle
from pathlib import Path
from typing import Any

# (module, name) pairs that may be resolved. numpy moved its internals from numpy.core to numpy._core
# in 2.0; files written by either must load.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        # Python 3 writes bytes as _codecs.encode(str, "latin1") under protocol 2.
        ("_codecs", "encode"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("__builtin__", "set"),
        ("__builtin__", "frozenset"),
        ("__builtin__", "bytearray"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """A data pickle referenced a global outside the allow-list; nothing from it was run."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only resolves :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file: io.BufferedIOBase, *, source: str = "<stream>", encoding: str = "latin1"):
        # latin1 decodes Python 2 byte strings (the original CIFAR files) without loss.
        super().__init__(file, encoding=encoding)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"refusing to unpickle {self._source}: it references {module}.{name}, which is not an "
                "allowed global for a data file (only numpy arrays, dtypes and plain containers are). "
                "The file may be corrupt or tampered with."
            )
        return super().find_class(module, name)


def load_restricted(path: str | Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`; raises :class:`UnsafePickleError` on a
    disallowed global."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, source=str(path)).load()
