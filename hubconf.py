"""torch.hub entry points for the spikecore backbones, from a local checkout (nothing is downloaded).

    import torch
    model = torch.hub.load("/path/to/checkout", "spikformer_4_384", source="local",
                           checkpoint_path="spikformer.safetensors", num_classes=10)

Every model registered in ``spikecore.models`` (``spikecore.models.list_models()``: the backbones, and the
models of the packages installed beside spikecore, e.g. ``tdformer_*``) is an entry point
taking ``checkpoint_path`` (optional) and the model's constructor overrides: it is
``spikecore.models.create_model(name, checkpoint_path=..., **overrides)``. A checkpoint may be spikecore's
own or a spikingjelly 2.0 Spikformer / SDT / QKFormer state dict (converted on the fly); see
shared/spikecore/README.md.
"""

import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch", "numpy"]

# Use this checkout's spikecore (also when it is not installed). Private names only: torch.hub lists every
# public callable of this module as an entry point.
_SRC = _Path(__file__).resolve().parent / "shared" / "spikecore" / "src"
if _SRC.is_dir() and "spikecore" not in _sys.modules and str(_SRC) not in _sys.path:
    _sys.path.insert(0, str(_SRC))

from spikecore.models import create_model as _create_model  # noqa: E402
from spikecore.models import list_models as _list_models  # noqa: E402


def _entry(name: str):
    def entry(checkpoint_path: str | None = None, **overrides):
        return _create_model(name, checkpoint_path=checkpoint_path, **overrides)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"spikecore's {name}: ``create_model({name!r}, checkpoint_path=..., **overrides)``.\n\n"
        f"{_create_model.__doc__}"
    )
    return entry


for _name in _list_models():
    globals()[_name] = _entry(_name)
