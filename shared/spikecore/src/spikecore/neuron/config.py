"""``NeuronConfig``: the LIF neuron's settings as one value, passed through every layer that builds neurons.

The same eight settings reach :func:`spikecore.lif_multi_step`, :class:`spikecore.LIF`, the attention
functions and modules (:mod:`spikecore.attention`), every backbone (:mod:`spikecore.models`) and the
packages' own neurons (TDFormer's processing module, SpiLiFormer's feedback decoders) as
``neuron=NeuronConfig(...)``, instead of a row of keyword arguments repeated at every level. A frozen
dataclass, so it nests in YAML configs (``model: {neuron: {tau: 2.0, detach_reset: true}}``: jsonargparse
builds it and rejects an unknown key) and is hashable.

The older keyword arguments (``tau=``, ``v_threshold=``, ...) are still accepted wherever they were; giving
``neuron=`` together with any of them is a ``TypeError`` naming them, so a setting is never silently
overridden. A ``NeuronConfig`` is the complete neuron: its defaults are :func:`lif_multi_step`'s (detached
reset off). Components whose neuron differs by default say so and export it: the backbones, the attention
modules and TDFormer's processing module use :data:`BACKBONE_NEURON` (``detach_reset=True``), the attention
functions :data:`ATTENTION_NEURON` (``v_threshold=0.5`` too); change one setting of those with
``BACKBONE_NEURON.replace(tau=3.0)``.
"""

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .surrogate import resolve

__all__ = [
    "ATTENTION_NEURON",
    "BACKBONE_NEURON",
    "BACKENDS",
    "DEFAULT_NEURON",
    "NEURON_FIELDS",
    "UNSET",
    "NeuronConfig",
    "neuron_from",
    "neuron_keywords",
    "neuron_options",
]

BACKENDS = ("auto", "triton", "cpu", "torch")


class Unset:
    """The type of :data:`UNSET`: the default of the older neuron keyword arguments, "not given" (``None``
    cannot say that: ``v_reset=None`` is a soft reset, ``alpha=None`` the surrogate's default)."""

    _instance: "Unset | None" = None

    def __new__(cls) -> "Unset":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self):
        return (Unset, ())

    def __copy__(self) -> "Unset":
        return self

    def __deepcopy__(self, memo) -> "Unset":
        return self


UNSET: Any = Unset()


def _number(name: str, value: Any, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a number or None" if optional else "a number"
        hint = "; a per-neuron tensor tau goes to lif_multi_step(x, tau=tensor)" if name == "tau" else ""
        raise TypeError(f"NeuronConfig.{name} must be {kind}, got {value!r}{hint}")
    return float(value)


@dataclass(frozen=True)
class NeuronConfig:
    """The settings of a multi-step LIF neuron (the equations of :mod:`spikecore.neuron.reference`).

    Attributes:
        tau: membrane time constant, > 0 (inf allowed: no leak with ``decay_input=False``; NaN refused).
        v_threshold: firing threshold V_th.
        v_reset: the hard reset's potential; ``None`` is a soft reset (``V -= V_th`` on a spike).
        decay_input: ``H = V + (X - (V - V_reset)) / tau`` (True) or ``H = V - (V - V_reset) / tau + X``.
        detach_reset: the reset is not differentiated through (spikingjelly's ``detach_reset``).
        surrogate: the surrogate gradient's name (``spikecore.SURROGATES``); ``alpha`` its sharpness
            (``None``: the surrogate's default, 4 for sigmoid).
        backend: where the neuron computes, not how it behaves: ``"auto"``, ``"triton"``, ``"cpu"`` or
            ``"torch"`` (see :func:`spikecore.lif_multi_step`).

    Values are checked when the config is made (the errors :func:`lif_multi_step` gives), and numbers are
    stored as floats (``tau: 3`` in YAML is 3.0).
    """

    tau: float = 2.0
    v_threshold: float = 1.0
    v_reset: float | None = 0.0
    decay_input: bool = True
    detach_reset: bool = False
    surrogate: str = "sigmoid"
    alpha: float | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        tau = _number("tau", self.tau)
        if not tau > 0:
            raise ValueError(f"tau must be positive (> 0, inf allowed; NaN is not), got {self.tau}")
        v_threshold = _number("v_threshold", self.v_threshold)
        if math.isnan(v_threshold):
            raise ValueError("NeuronConfig.v_threshold must not be NaN")
        v_reset = _number("v_reset", self.v_reset, optional=True)
        alpha = _number("alpha", self.alpha, optional=True)
        for name in ("decay_input", "detach_reset"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"NeuronConfig.{name} must be True or False, got {getattr(self, name)!r}")
        resolve(self.surrogate, alpha)  # an unknown surrogate or a bad alpha: ValueError
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        for name, value in (
            ("tau", tau),
            ("v_threshold", v_threshold),
            ("v_reset", v_reset),
            ("alpha", alpha),
        ):
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> "NeuronConfig":
        """A copy with ``changes`` (e.g. ``BACKBONE_NEURON.replace(tau=3.0)``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as keyword arguments (plain values: what checkpoints and YAML keep)."""
        return {name: getattr(self, name) for name in NEURON_FIELDS}

    @classmethod
    def coerce(cls, value: "NeuronConfig | Mapping[str, Any]") -> "NeuronConfig":
        """``value`` as a NeuronConfig: itself, or built from a mapping of its settings (a config's or a
        checkpoint's ``neuron`` section); an unknown key is a ``TypeError`` listing the valid ones."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(NEURON_FIELDS))
            if unknown:
                raise TypeError(
                    f"unknown neuron setting(s) {', '.join(map(repr, unknown))}; a NeuronConfig has "
                    f"{', '.join(NEURON_FIELDS)}"
                )
            return cls(**value)
        raise TypeError(f"neuron must be a NeuronConfig (or a mapping of its settings), got {value!r}")


NEURON_FIELDS = tuple(f.name for f in dataclasses.fields(NeuronConfig))

DEFAULT_NEURON = NeuronConfig()
"""lif_multi_step's and LIF's neuron when none is given."""

BACKBONE_NEURON = NeuronConfig(detach_reset=True)
"""The neuron of the backbones, the attention modules and TDFormer's processing module when none is given:
tau 2, V_th 1, hard reset to 0, detached reset, sigmoid surrogate (alpha 4), the papers' LIF. (An
attention module's attention-map neuron takes the module's ``attn_v_threshold``, 0.5, instead of V_th.)"""

ATTENTION_NEURON = NeuronConfig(v_threshold=0.5, detach_reset=True)
"""The attention functions' neuron (:mod:`spikecore.attention.functional`) when none is given."""


def neuron_keywords(scope: Mapping[str, Any]) -> dict[str, Any]:
    """The older neuron keyword arguments of a call, by their NeuronConfig names, from ``locals()`` taken
    first thing in the function (its parameters, before any is rebound): the ``loose`` of
    :func:`neuron_from`. A function that takes only some of the settings as keywords gives only those."""
    return {name: scope[name] for name in NEURON_FIELDS if name in scope}


def neuron_from(
    neuron: "NeuronConfig | Mapping[str, Any] | None",
    loose: Mapping[str, Any],
    default: NeuronConfig = DEFAULT_NEURON,
    where: str = "this call",
) -> NeuronConfig:
    """One NeuronConfig from either spelling: ``neuron`` (a NeuronConfig or a mapping of its settings), or
    the older keyword arguments ``loose`` (those not :data:`UNSET`) over ``default``. Both at once is a
    ``TypeError`` naming the keywords, never a silent choice between them."""
    given = {k: v for k, v in loose.items() if v is not UNSET}
    if neuron is None:
        return default.replace(**given) if given else default
    if given:
        keys = ", ".join(f"{k}=" for k in sorted(given))
        raise TypeError(
            f"{where} got neuron= and the neuron keyword(s) {keys}: give the settings one way, either "
            f"inside neuron=NeuronConfig(...) (e.g. neuron.replace({min(given)}=...)) or as keywords alone"
        )
    return NeuronConfig.coerce(neuron)


def neuron_options(
    neuron: "NeuronConfig | Mapping[str, Any] | None", loose: Mapping[str, Any], where: str
) -> dict:
    """lif_multi_step's and LIF's settings as a dict from either spelling. The keyword spelling's values
    are passed on as given (unset ones take :data:`DEFAULT_NEURON`'s), for the op's own checks and messages,
    as before NeuronConfig existed; ``neuron=`` goes through :func:`neuron_from`."""
    if neuron is None:
        return {k: getattr(DEFAULT_NEURON, k) if v is UNSET else v for k, v in loose.items()}
    return neuron_from(neuron, loose, where=where).to_dict()
