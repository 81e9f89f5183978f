"""The models spiliformer offers: the three SpiLiFormer variants and their QKFormer baselines.

``create_model("spiliformer_4_384")`` is SpiLiFormer on QKFormer HST-4-384 (FF-LiDiff in stages 1-2,
FB-LiDiff in stage 3, feedback generator); ``create_model("qkformer_hst_4_384")`` the plain baseline from
spikecore. Keyword overrides go to :class:`SpiLiFormer` when they are its options (``aug``,
``decoder_order``, ``decoder_bn``, ``decoder_bn_first``, ``authors_compat``) or ``kv_diff``, otherwise to the
backbone builder.

The ``spiliformer_*`` builders live in spikecore's one model registry (:mod:`spikecore.models.registry`):
importing this module registers them, and spiliformer's entry point (group ``spikecore.models``, in its
``pyproject.toml``) names this module, so ``spikecore.models.create_model("spiliformer_4_384")`` works in a
fresh process without importing spiliformer first. :func:`create_model` and :func:`list_models` here are
views of that registry restricted to spiliformer's models, with the same shell-style matching.
"""

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from spikecore.models import create_model as create_registered
from spikecore.models import list_models as list_registered
from spikecore.models import register_model

from .attention import use_kv_difference
from .model import SpiLiFormer


@dataclass(frozen=True)
class Variant:
    baseline: str  # the spikecore QKFormer it is built on (and compared with)
    attn: tuple[str, ...]  # attention kind per stage
    decoder_order: str
    decoder_bn: bool


VARIANTS = {
    "spiliformer_4_384": Variant(
        "qkformer_hst_4_384", ("ff_lidiff", "ff_lidiff", "fb_lidiff"), "backward", True
    ),
    # DVS: stage 1 keeps plain QKTA, the decoder has no BN.
    "spiliformer_2_256_dvs": Variant("qkformer_hst_2_256", ("qkta", "fb_lidiff"), "backward", False),
    "spiliformer_10_768": Variant(
        "qkformer_hst_10_768", ("ff_lidiff", "ff_lidiff", "fb_lidiff"), "forward", True
    ),
}
BASELINES = tuple(v.baseline for v in VARIANTS.values())
MODELS = (*VARIANTS, *BASELINES)
OPTIONS = frozenset(inspect.signature(SpiLiFormer).parameters) - {"backbone"} | {"kv_diff"}


def _builder(name: str, variant: Variant) -> Callable[..., SpiLiFormer]:
    def build(**overrides: Any) -> SpiLiFormer:
        opts = {k: overrides.pop(k) for k in list(overrides) if k in OPTIONS}
        opts.setdefault("decoder_order", variant.decoder_order)
        opts.setdefault("decoder_bn", variant.decoder_bn)
        kv_diff = opts.pop("kv_diff", False)
        overrides.setdefault("attn", variant.attn)
        backbone = create_registered(variant.baseline, **overrides)
        if kv_diff:
            use_kv_difference(backbone)
        return SpiLiFormer(backbone, **opts)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"SpiLiFormer on spikecore's {variant.baseline} (attention {', '.join(variant.attn)}). Overrides: "
        f"SpiLiFormer's options ({', '.join(sorted(OPTIONS))}), the rest go to the backbone builder."
    )
    return build


for _name, _variant in VARIANTS.items():
    register_model(_builder(_name, _variant))


def list_models(pattern: str | None = None) -> list[str]:
    """spiliformer's models (the variants and their baselines), sorted, optionally filtered by a
    shell-style ``pattern`` as :func:`spikecore.models.list_models` (e.g. ``"qkformer*"``)."""
    own = set(MODELS)
    return [n for n in list_registered(pattern) if n in own]


def create_model(name: str, checkpoint_path: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build one of spiliformer's models through spikecore's registry; ``overrides`` are builder keyword
    arguments (e.g. ``num_classes=100``), ``checkpoint_path`` as :func:`spikecore.models.create_model`.

    ``kv_diff=True`` (SpiLiFormer only) uses the DVS code's K^T V difference in the FB blocks
    (:class:`~spiliformer.attention.KVDifferenceAttention`).
    """
    names = list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Registered: {', '.join(names)}")
    if name in BASELINES:
        stray = sorted(set(overrides) & OPTIONS)
        if stray:
            raise ValueError(f"{stray} are SpiLiFormer options but {name!r} is a plain QKFormer baseline")
    return create_registered(name, checkpoint_path=checkpoint_path, **overrides)
