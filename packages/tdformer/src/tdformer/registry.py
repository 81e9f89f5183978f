"""The models tdformer offers: spikecore's backbones (the baselines) and their ``tdformer_`` versions.

``create_model("spikformer_4_384")`` is the plain backbone; ``create_model("tdformer_spikformer_4_384")``
the same backbone (stateful neurons) wrapped in :class:`TDFormer`. Keyword overrides go to TDFormer when
they are its options (``segments``, ``feedback``, ``control``, ...), otherwise to the backbone builder.
"""

import difflib
import inspect

from torch import nn

from spikecore.models import create_model as create_backbone

from .model import TDFormer

BACKBONES = (
    "spikformer_4_384",
    "spikformer_2_256_dvs",
    "sdt_2_256",
    "sdt_2_512",
    "qkformer_hst_4_384",
    "qkformer_hst_2_256",
    "qkformer_hst_10_768",
)
PREFIX = "tdformer_"
TDFORMER_OPTIONS = frozenset(inspect.signature(TDFormer).parameters) - {"backbone"}


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names (baselines and feedback models), optionally filtered by a substring."""
    names = [*BACKBONES, *(PREFIX + b for b in BACKBONES)]
    return sorted(n for n in names if pattern is None or pattern in n)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` are builder keyword arguments (e.g. ``num_classes=100``)."""
    names = list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Registered: {', '.join(names)}")
    if not name.startswith(PREFIX):
        stray = sorted(set(overrides) & TDFORMER_OPTIONS)
        if stray:
            raise ValueError(
                f"{stray} are TDFormer options but {name!r} is a plain backbone; use {PREFIX + name!r}"
            )
        return create_backbone(name, **overrides)
    td = {k: overrides.pop(k) for k in list(overrides) if k in TDFORMER_OPTIONS}
    overrides["stateful"] = True  # segments carry the membrane from one to the next
    return TDFormer(create_backbone(name.removeprefix(PREFIX), **overrides), **td)
