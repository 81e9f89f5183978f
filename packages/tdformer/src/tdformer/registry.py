"""The models tdformer offers: spikecore's backbones (the baselines) and their ``tdformer_`` versions.

``create_model("spikformer_4_384")`` is the plain backbone; ``create_model("tdformer_spikformer_4_384")``
the same backbone (stateful neurons) wrapped in :class:`TDFormer`. Keyword overrides go to TDFormer when
they are its options (``segments``, ``feedback``, ``control``, ``pm_neuron``, ...), otherwise to the
backbone builder.

The ``tdformer_*`` builders live in spikecore's one model registry (:mod:`spikecore.models.registry`):
importing this module registers them, and tdformer's entry point (group ``spikecore.models``, in its
``pyproject.toml``) names this module, so ``spikecore.models.create_model("tdformer_spikformer_4_384")``
works in a fresh process without importing tdformer first. :func:`create_model` and :func:`list_models`
here are views of that registry restricted to tdformer's models, with the same shell-style matching.
"""

import difflib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from spikecore.models import create_model as create_registered
from spikecore.models import list_models as list_registered
from spikecore.models import register_model

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
MODELS = (*BACKBONES, *(PREFIX + b for b in BACKBONES))
TDFORMER_OPTIONS = frozenset(inspect.signature(TDFormer).parameters) - {"backbone"}


def _builder(backbone: str) -> Callable[..., TDFormer]:
    def build(**overrides: Any) -> TDFormer:
        td = {k: overrides.pop(k) for k in list(overrides) if k in TDFORMER_OPTIONS}
        overrides["stateful"] = True  # segments carry the membrane from one to the next
        return TDFormer(create_registered(backbone, **overrides), **td)

    build.__name__ = build.__qualname__ = PREFIX + backbone
    build.__doc__ = (
        f"TDFormer around spikecore's {backbone} (stateful neurons). Overrides: TDFormer's options "
        f"({', '.join(sorted(TDFORMER_OPTIONS))}), the rest go to the backbone builder."
    )
    return build


for _backbone in BACKBONES:
    register_model(_builder(_backbone))


def list_models(pattern: str | None = None) -> list[str]:
    """tdformer's models (the baselines and their feedback versions), sorted, optionally filtered by a
    shell-style ``pattern`` as :func:`spikecore.models.list_models` (e.g. ``"tdformer_*"``)."""
    own = set(MODELS)
    return [n for n in list_registered(pattern) if n in own]


def create_model(name: str, checkpoint_path: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build one of tdformer's models through spikecore's registry; ``overrides`` are builder keyword
    arguments (e.g. ``num_classes=100``), ``checkpoint_path`` as :func:`spikecore.models.create_model`."""
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
    return create_registered(name, checkpoint_path=checkpoint_path, **overrides)
