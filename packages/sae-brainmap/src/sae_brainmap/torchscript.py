"""The tensors of a TorchScript archive (OpenAI's own CLIP files, ``ViT-B-16.pt``), read without running it.

``torch.jit.load`` is not safe on a file from elsewhere: it compiles the archive's ``code/`` and runs it
(a class's ``__setstate__``, for one). :func:`read_torchscript_state_dict` reads only data instead:

- ``<archive>/data.pkl`` (the pickled module tree) goes through a restricted unpickler: TorchScript classes
  (``__torch__.*``) become inert placeholders that only record the attributes set on them; the tensor
  rebuild function, ``collections.OrderedDict``, the ``torch.*Storage`` type tags and TorchScript's
  list/dict type tags map to small functions written here; every other global is refused, so nothing in
  the file can call into Python.
- A storage is the bytes of ``<archive>/data/<key>``, checked against the element count the pickle gives,
  viewed as the dtype its type tag names (``torch.frombuffer``); tensors are strided views of them
  (bounds checked by ``as_strided``).
- Which attributes are parameters and buffers comes from the ``__parameters__`` / ``__buffers__`` lines of
  each class's source in ``<archive>/code/``, read as text (``ast.literal_eval`` of the list, never
  compiled), so the names and the set of tensors are those of ``torch.jit.load(path).state_dict()``.
"""

import ast
import io
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
_MAX_DEPTH = 200  # module nesting; a deeper (or cyclic) tree is not a real model


class TorchScriptReadError(ValueError):
    """A TorchScript archive whose tensors cannot be read safely (damaged, foreign, or unsafe content)."""


class ScriptObject:
    """A TorchScript object from the pickle: its class name and the state set on it, nothing else."""

    qualname = "?"

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


class _Frozen:
    """What the unpickler hands out for an allowed global: the pickle may call it, never change it (its
    BUILD opcode would otherwise set attributes on it)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise TorchScriptReadError("the pickle tries to change an object it did not create (refused)")


class _StorageType(_Frozen):
    __slots__ = ("dtype", "name")

    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Function(_Frozen):
    __slots__ = ("fn",)

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> Tensor:  # fmt: skip
    """Only a strided view of a storage read here (hooks and metadata are dropped)."""
    if not isinstance(storage, Tensor):
        raise TorchScriptReadError(f"a tensor is rebuilt from {type(storage).__name__}, not a storage")
    try:
        return storage.as_strided(tuple(size), tuple(stride), int(storage_offset))
    except (RuntimeError, TypeError, ValueError) as err:
        raise TorchScriptReadError(f"a tensor does not fit its storage ({err})") from None


def _same(value, *_tags):  # torch.jit._pickle's type tags: the value itself
    return value


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _same,
    ("torch.jit._pickle", "build_intlist"): _same,
    ("torch.jit._pickle", "build_doublelist"): _same,
    ("torch.jit._pickle", "build_boollist"): _same,
    ("torch.jit._pickle", "build_tensorlist"): _same,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _Function(_ALLOWED[(module, name)])
        raise TorchScriptReadError(
            f"{self.path} refers to {module}.{name}, which a file of weights has no reason to hold "
            "(refused: it could run code)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchScriptReadError(f"{self.path}: unknown persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise TorchScriptReadError(f"{self.path}: malformed storage reference {str(pid)[:80]}")
        if key not in self.storages:
            member = f"{self.prefix}data/{key}"
            try:
                info = self.archive.getinfo(member)
            except KeyError:
                raise TorchScriptReadError(f"{self.path} lacks the storage {member}") from None
            itemsize = torch.empty((), dtype=kind.dtype).element_size()
            if numel < 0 or info.file_size != numel * itemsize:
                raise TorchScriptReadError(
                    f"{self.path}: storage {member} holds {info.file_size} bytes, its reference says "
                    f"{numel} x {itemsize}"
                )
            raw = bytearray(self.archive.read(member))
            self.storages[key] = (
                torch.frombuffer(raw, dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)
            )
        storage = self.storages[key]
        if storage.dtype != kind.dtype:
            raise TorchScriptReadError(f"{self.path}: storage {key} is referenced with two dtypes")
        return storage


def _prefix(archive: zipfile.ZipFile) -> str:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise TorchScriptReadError(f"{archive.filename} is not a TorchScript archive (no single */data.pkl)")
    return pickles[0][: -len("data.pkl")]


def _class_members(archive: zipfile.ZipFile, prefix: str, qualname: str) -> list[str] | None:
    """The ``__parameters__`` + ``__buffers__`` of a class, from its source read as text (None: not found)."""
    module, _, name = qualname.rpartition(".")
    member = f"{prefix}code/{module.replace('.', '/')}.py"
    try:
        source = archive.read(member).decode("utf-8", "replace")
    except KeyError:
        return None
    lines = source.splitlines()
    header = re.compile(rf"^class {re.escape(name)}\(")
    for i, line in enumerate(lines):
        if not header.match(line):
            continue
        found: dict[str, list[str]] = {}
        for body in lines[i + 1 :]:
            if body and not body.startswith(" "):
                break
            m = re.match(r"^\s+(__parameters__|__buffers__)\s*=\s*(\[.*\])\s*$", body)
            if m:
                try:
                    names = ast.literal_eval(m.group(2))
                except (ValueError, SyntaxError):
                    return None
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    return None
                found[m.group(1)] = names
        if "__parameters__" in found and "__buffers__" in found:
            return found["__parameters__"] + found["__buffers__"]
        return None
    return None


def _collect(obj: ScriptObject, prefix: str, archive, root: str, out: dict, depth: int, stack: set) -> None:
    if depth > _MAX_DEPTH or id(obj) in stack:
        raise TorchScriptReadError("the module tree is cyclic or absurdly deep: not a model")
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        return  # an object with custom state (a C++ class, say): no parameters of the module tree
    members = _class_members(archive, root, obj.qualname)
    stack = stack | {id(obj)}
    for key, value in state.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, Tensor) and (members is None or key in members):
            out[prefix + key] = value
        elif isinstance(value, ScriptObject):
            _collect(value, f"{prefix}{key}.", archive, root, out, depth + 1, stack)


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a zip archive with TorchScript code (``*/code/`` members)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in n for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def read_torchscript_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The parameters and buffers of the TorchScript module saved at ``path``, as a flat dict with dotted
    names (the keys and values of ``torch.jit.load(path).state_dict()``), without running the archive."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            root = _prefix(archive)
            if f"{root}byteorder" in archive.namelist():
                order = archive.read(f"{root}byteorder").decode(errors="replace").strip()
                if order != "little":
                    raise TorchScriptReadError(f"{path} was written {order}-endian: not supported")
            unpickler = _Unpickler(archive.read(f"{root}data.pkl"), archive, root, path)
            top = unpickler.load()
            if not isinstance(top, ScriptObject):
                raise TorchScriptReadError(f"{path}: data.pkl does not hold a TorchScript module")
            out: dict[str, Tensor] = {}
            _collect(top, "", archive, root, out, 0, set())
    except TorchScriptReadError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise TorchScriptReadError(f"{path} is a damaged archive ({type(err).__name__}: {err})") from None
    except (pickle.UnpicklingError, TypeError, ValueError, AttributeError, IndexError, KeyError) as err:
        raise TorchScriptReadError(
            f"{path}: its data.pkl cannot be read ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    return out
