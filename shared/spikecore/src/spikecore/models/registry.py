"""Name -> builder registry for the spiking models (timm style), shared by every package.

Each model family registers one builder per published variant with :func:`register_model`; a builder
takes keyword overrides of the model's constructor arguments and returns the model.
:func:`create_model` looks a name up and forwards the overrides; with ``checkpoint_path`` it also loads
weights (spikecore's own, or spikingjelly's converted on the fly: :mod:`spikecore.models.weights`).

One registry for the monorepo: spikecore's backbones register here at import, and the packages built on
spikecore register their models (``tdformer_*``, ``spiliformer_*``) here too, when they are imported. So
that ``create_model("tdformer_spikformer_4_384")`` works without importing tdformer first, a package
declares an entry point in the group ``spikecore.models`` (its ``pyproject.toml``::

    [project.entry-points."spikecore.models"]
    tdformer = "tdformer.registry"

naming a module that registers its models when imported, or a function that does when called). The entry
points are loaded lazily, once: by :func:`list_models`, and by :func:`create_model` for a name not yet
registered. spikecore never imports the packages by name. Names are matched with shell-style patterns
(:mod:`fnmatch`) everywhere, the packages' ``list_models`` included.
"""

import difflib
import fnmatch
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, overload

from torch import nn

__all__ = [
    "ENTRY_POINT_GROUP",
    "build_model",
    "create_model",
    "list_models",
    "load_entry_points",
    "register_model",
]

ENTRY_POINT_GROUP = "spikecore.models"

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_entry_points_loaded = False

F = TypeVar("F", bound=Callable[..., nn.Module])
M = TypeVar("M", bound=nn.Module)


@overload
def register_model(fn: F, *, name: str | None = None) -> F: ...
@overload
def register_model(fn: None = None, *, name: str | None = None) -> Callable[[F], F]: ...
def register_model(fn=None, *, name=None):
    """Register ``fn`` under ``name`` (default: its ``__name__``); usable as ``@register_model``.

    Registering the same builder again under its name is a no-op (a package module imported twice, or
    loaded both by an import and by its entry point); another builder under a taken name is an error.
    """
    if fn is None:
        return lambda f: register_model(f, name=name)
    key = fn.__name__ if name is None else name
    if _BUILDERS.get(key, fn) is not fn:
        raise ValueError(f"model {key!r} is already registered (by {_BUILDERS[key].__module__})")
    _BUILDERS[key] = fn
    return fn


def load_entry_points() -> None:
    """Import the packages' model registrations (entry points of the group ``spikecore.models``), once.

    A package whose registration fails (a broken install) is reported with a warning and left out; the
    other models stay usable.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True  # before loading: a registration may itself call list_models
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj):
                obj()
        except Exception as err:  # a plugin must not take the shared registry down with it
            warnings.warn(
                f"spikecore.models: the models of entry point {ep.name!r} ({ep.value}) could not be "
                f"registered: {type(err).__name__}: {err}",
                RuntimeWarning,
                stacklevel=2,
            )


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names (spikecore's backbones and the installed packages' models), optionally
    filtered by a shell-style ``pattern`` (e.g. ``"qkformer*"``, ``"tdformer_*"``, ``"*_4_384"``)."""
    load_entry_points()
    names = sorted(_BUILDERS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def create_model(name: str, checkpoint_path: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build the registered model ``name``; ``overrides`` replace its constructor defaults.

    ``checkpoint_path``: weights to load, strictly, into the model built with ``overrides``: a spikecore
    state dict (safetensors, or a torch file read with ``weights_only``: plain, a Lightning checkpoint's
    ``state_dict`` with its ``net.`` / ``net.backbone.`` prefix, DDP's ``module.``), or a spikingjelly 2.0
    Spikformer / SDT / QKFormer state dict (recognised by its names and converted; spikingjelly's layout
    settings are applied unless overridden). See :mod:`spikecore.models.weights`.

    Raises ``ValueError`` for an unknown name (with the closest registered names) or for an override
    that the model's constructor does not take, and :class:`spikecore.serialization.CheckpointError` (a
    ``ValueError``) for weights that cannot be read or do not fit, naming the missing / unexpected keys.
    """
    if name not in _BUILDERS:
        load_entry_points()
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, list(_BUILDERS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (registered: {', '.join(list_models())})")
    if checkpoint_path is None:
        return _BUILDERS[name](**overrides)
    from .weights import build_with_weights

    return build_with_weights(name, _BUILDERS[name], checkpoint_path, overrides)


def build_model(cls: type[M], defaults: dict[str, Any], overrides: dict[str, Any]) -> M:
    """``cls(**{**defaults, **overrides})`` after checking every key names a constructor argument.

    The check happens here, not as a ``TypeError`` deep inside a constructor, so that a misspelt
    override fails with the list of the valid ones.
    """
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    unknown = sorted(set(defaults) - set(valid))
    if unknown:  # a builder bug, not a user error: report it all the same
        raise ValueError(f"builder defaults {unknown} are not arguments of {cls.__name__}")
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
        described = ", ".join(
            f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items()
        )
        raise ValueError(
            f"unknown override(s) {described} for {cls.__name__}; valid: {', '.join(sorted(valid))}"
        )
    return cls(**{**defaults, **overrides})
