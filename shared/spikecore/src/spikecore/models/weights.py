"""Weight files for :func:`spikecore.models.create_model` (``checkpoint_path=``) and the converter.

Read safely, whatever their origin:

- **safetensors** (recognised by its header, whatever the file name): parsed by the ``safetensors``
  package (no pickle at all); files written here carry a CRC-32 of their tensors in the metadata
  (``spikecore.crc32``), checked on reading, so a bit flip is refused rather than loaded;
- **torch files** through :func:`spikecore.serialization.safe_torch_load` (``weights_only=True``, zip
  checksums verified): a plain state dict, or one under ``state_dict`` (Lightning), ``model``, ``net`` or
  ``module`` (training scripts).

A spikingjelly 2.0 Spikformer / SDT / QKFormer state dict (recognised by its module names) is converted by
:func:`~spikecore.models.convert.convert_spikingjelly_state_dict`; so is a safetensors file the converter
wrote (its metadata says so), and both build the model in spikingjelly's layout
(:data:`~spikecore.models.convert.SPIKINGJELLY_LAYOUT`) unless an override says otherwise. A spikecore state
dict may carry a prefix (``net.`` of the Lightning classifier, ``net.backbone.`` of TDFormer / SpiLiFormer,
``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``): the prefix under which the model's names are found
is stripped and the rest of the file ignored. Every failure is one
:class:`~spikecore.serialization.CheckpointError`.
"""

import inspect
import os
import tempfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import writable_dir
from ..serialization import (
    CheckpointError,
    check_finite,
    first_line,
    local_file,
    safe_torch_load,
    state_dict_mismatch,
)
from .convert import (
    SPIKINGJELLY_LAYOUT,
    arch_class,
    convert_spikingjelly_state_dict,
    detect_spikingjelly_arch,
)

__all__ = ["build_with_weights", "load_weights_into", "read_state_dict", "read_weights", "save_safetensors"]

_CONTAINER_KEYS = ("state_dict", "model", "net", "module", "model_state_dict")
_CRC_KEY = "spikecore.crc32"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:  # pragma: no cover - timm (spikecore[train]) depends on it
        raise CheckpointError(
            "reading or writing .safetensors needs the `safetensors` package (pip install safetensors)"
        ) from err
    return safetensors


def _is_safetensors(path: Path) -> bool:
    """safetensors' layout: an 8-byte little-endian header length, then that many bytes of JSON."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    return head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _crc32(state: Mapping[str, torch.Tensor]) -> str:
    crc = 0
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"", crc)
    return f"{crc:08x}"


def _tensor_dict(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    def is_state(x: Any) -> bool:
        return isinstance(x, Mapping) and bool(x) and all(isinstance(v, torch.Tensor) for v in x.values())

    if is_state(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _CONTAINER_KEYS:
            if is_state(obj.get(key)):
                return dict(obj[key])
    raise CheckpointError(
        f"{what} {path} holds no state dict of tensors (neither at its top level nor under any of "
        f"{', '.join(_CONTAINER_KEYS)})"
    )


def read_state_dict(
    path: str | Path, what: str = "weights file"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors or torch weight file, read without running code from it.

    Finite values are checked; the safetensors metadata is ``{}`` for torch files."""
    p = local_file(path, what)
    metadata: dict[str, str] = {}
    if _is_safetensors(p):
        st = _safetensors()
        try:
            with st.safe_open(str(p), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors' own error types differ between versions
            raise CheckpointError(
                f"cannot read {what} {p}: {first_line(err)}. It is corrupted or truncated."
            ) from err
        if not state:
            raise CheckpointError(f"{what} {p} holds no tensors")
        if _CRC_KEY in metadata and metadata[_CRC_KEY] != _crc32(state):
            raise CheckpointError(
                f"{what} {p} is corrupted: the checksum of its tensors does not match the one it was written "
                "with (a bit flipped on disk or in transfer). Use an intact copy."
            )
    else:
        state = _tensor_dict(safe_torch_load(p, what), p, what)
    check_finite(state, p, what)
    return state, metadata


def save_safetensors(
    state: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state`` as safetensors (atomically: a partial file never takes the name), with a CRC-32 of
    its tensors and ``metadata`` in the header; returns the path."""
    st = _safetensors()
    p = Path(path).expanduser()
    writable_dir(p.parent if str(p.parent) else Path("."), "output folder")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {**(metadata or {}), _CRC_KEY: _crc32(tensors)}
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        st.torch.save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


class ModelWeights:
    """A weight file read for a model: spikecore names, and the spikingjelly arch it came from (or None)."""

    def __init__(self, state: dict[str, torch.Tensor], source_arch: str | None, path: Path):
        self.state = state
        self.source_arch = source_arch
        self.path = path

    @property
    def layout(self) -> dict[str, str]:
        return dict(SPIKINGJELLY_LAYOUT[self.source_arch]) if self.source_arch else {}


def read_weights(path: str | Path) -> ModelWeights:
    """A weight file with spikingjelly's names (by key names, or by a converter's metadata) converted."""
    state, metadata = read_state_dict(path)
    p = Path(path).expanduser()
    arch = detect_spikingjelly_arch(state)
    if arch is not None:
        return ModelWeights(convert_spikingjelly_state_dict(state, arch), arch, p)
    source = metadata.get("spikecore.arch") if metadata.get("spikecore.source") == "spikingjelly" else None
    if source is not None and source not in SPIKINGJELLY_LAYOUT:
        raise CheckpointError(f"{p} says it was converted from spikingjelly {source!r}, an unknown arch")
    return ModelWeights(state, source, p)


def _strip_prefix(
    state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The part of ``state`` under the prefix where most of ``own``'s names are found."""
    anchors = [k for k in ("head.weight", next(iter(own), "")) if k in own]
    candidates = {""}
    for a in anchors:
        for k in state:
            if k.endswith("." + a):
                candidates.add(k[: -len(a)])

    def overlap(prefix: str) -> int:
        return sum(1 for k in own if prefix + k in state)

    best = max(sorted(candidates), key=overlap)
    if best == "" or overlap(best) <= overlap(""):
        return dict(state)
    return {k[len(best) :]: v for k, v in state.items() if k.startswith(best)}


def load_weights_into(model: nn.Module, weights: ModelWeights, name: str = "the model") -> None:
    """Load ``weights`` into ``model`` strictly; a mismatch of names or shapes is one CheckpointError."""
    own = model.state_dict()
    state = _strip_prefix(weights.state, own)
    detail = state_dict_mismatch(own, state)
    if detail:
        if weights.source_arch:
            hint = (
                f"The weights are spikingjelly's {weights.source_arch}: pass the sizes its model was built "
                "with (e.g. embed_dim(s), depth(s), num_heads, num_classes, in_chans)."
            )
        else:
            hint = "Pass the overrides the weights were trained with (e.g. embed_dim, depth, num_classes)."
        raise CheckpointError(f"{weights.path} does not fit {name} ({detail}). {hint}")
    model.load_state_dict(state, strict=True)


def _built_class(builder: Callable[..., nn.Module]) -> type | None:
    ann = inspect.signature(builder).return_annotation
    return ann if isinstance(ann, type) and issubclass(ann, nn.Module) else None


def build_with_weights(
    name: str, builder: Callable[..., nn.Module], path: str | Path, overrides: Mapping[str, Any]
) -> nn.Module:
    """``builder(**overrides)`` with the weights of ``path`` loaded (see the module docstring)."""
    weights = read_weights(path)
    kwargs = dict(overrides)
    if weights.source_arch:
        expected = arch_class(weights.source_arch)
        built = _built_class(builder)
        if built is not None and not issubclass(built, expected):
            raise CheckpointError(
                f"{weights.path} holds spikingjelly {weights.source_arch} weights, but {name} is a "
                f"{built.__name__}: choose a {expected.__name__} model"
            )
        kwargs = {**weights.layout, **kwargs}
    model = builder(**kwargs)
    if weights.source_arch and not isinstance(model, arch_class(weights.source_arch)):
        raise CheckpointError(
            f"{weights.path} holds spikingjelly {weights.source_arch} weights, but {name} is a "
            f"{type(model).__name__}"
        )
    load_weights_into(model, weights, name)
    return model
