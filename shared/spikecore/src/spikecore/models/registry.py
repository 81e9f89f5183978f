"""Name -> builder registry for the spiking backbones (timm style).

Each model family registers one builder per published variant with :func:`register_model`; a builder
takes keyword overrides of the model class's constructor arguments and returns the model.
:func:`create_model` looks a name up and forwards the overrides; with ``checkpoint_path`` it also loads
weights (spikecore's own, or spikingjelly's converted on the fly: :mod:`spikecore.models.weights`).
"""

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

__all__ = ["build_model", "create_model", "list_models", "register_model"]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])
M = TypeVar("M", bound=nn.Module)


def register_model(fn: F) -> F:
    """Register ``fn`` under its ``__name__``; a second builder with the same name is an error."""
    name = fn.__name__
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered")
    _BUILDERS[name] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style ``pattern`` (e.g. ``"qkformer*"``)."""
    names = sorted(_BUILDERS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern)]


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
