"""The models spiliformer offers: the three SpiLiFormer variants and their QKFormer baselines.

``create_model("spiliformer_4_384")`` is SpiLiFormer on QKFormer HST-4-384 (FF-LiDiff in stages 1-2,
FB-LiDiff in stage 3, feedback generator); ``create_model("qkformer_hst_4_384")`` the plain baseline from
spikecore. Keyword overrides go to :class:`SpiLiFormer` when they are its options (``aug``,
``decoder_order``, ``decoder_bn``, ``decoder_bn_first``, ``authors_compat``) or ``kv_diff``, otherwise to the
backbone builder.
"""

import difflib
import inspect
from dataclasses import dataclass

from torch import nn

from spikecore.models import create_model as create_backbone

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
OPTIONS = frozenset(inspect.signature(SpiLiFormer).parameters) - {"backbone"} | {"kv_diff"}


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names (SpiLiFormer variants and baselines), optionally filtered by a substring."""
    return sorted(n for n in (*VARIANTS, *BASELINES) if pattern is None or pattern in n)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` are builder keyword arguments (e.g. ``num_classes=100``).

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
        return create_backbone(name, **overrides)
    variant = VARIANTS[name]
    opts = {k: overrides.pop(k) for k in list(overrides) if k in OPTIONS}
    opts.setdefault("decoder_order", variant.decoder_order)
    opts.setdefault("decoder_bn", variant.decoder_bn)
    kv_diff = opts.pop("kv_diff", False)
    overrides.setdefault("attn", variant.attn)
    backbone = create_backbone(variant.baseline, **overrides)
    if kv_diff:
        use_kv_difference(backbone)
    return SpiLiFormer(backbone, **opts)
