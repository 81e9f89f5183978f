"""QKFormer hierarchical spiking transformer (HST; Zhou et al., NeurIPS 2024).

Follows the reference code (github.com/zhouchenlin2096/QKFormer: ``cifar10/model.py``,
``cifar10-dvs/model.py``, ``imagenet/qkformer.py``):

* Stages of SEW-style blocks ``x = x + Attn(x); x = x + MLP(x)`` (MLP: two ``Conv1x1(bias)-BN-LIF``).
  The attention kind of each stage is the ``attn`` argument (QKFormer: Q-K token attention in the early
  stages, SSA in the last; SpiLiFormer reuses the model with ``("ff_lidiff", "ff_lidiff", "fb_lidiff")``).
* Patch embedding with deformed shortcut (PEDS). ``stem`` picks the reference's first embedding, every
  conv ``Conv3x3-BN[-MaxPool]-LIF`` (pool before the LIF), plus a ``Conv1x1(stride)-BN-LIF`` shortcut:

  - ``"cifar"``: in -> D0/2 -> D0, shortcut from the first conv, no downsampling (32x32 tokens);
  - ``"dvs"``: in -> D0/8 -> D0/4 (pool) -> D0/2 (pool) -> D0 (pool), shortcut (stride 4) from the
    second conv: 128x128 -> 16x16;
  - ``"imagenet"``: in -> D0/2 (pool) -> D0 (pool) -> D0, shortcut (stride 2) from the first: 224 -> 56.

  Between stages: ``Conv3x3(D/2 -> D)-BN-LIF``, ``Conv3x3(D -> D)-BN-LIF`` with one 3x3/2 max-pool (on
  the second conv for CIFAR/DVS, on the first for ImageNet, as in the reference codes) plus a
  ``Conv1x1/2-BN-LIF`` shortcut, summed.
* Head: mean over tokens then over T, then Linear.
"""

import itertools
from typing import Any

import torch
from torch import nn

from ..neuron.config import UNSET, NeuronConfig
from .base import SpikingBackbone
from .layers import ConvBNLIF, Neuron, SpikingBlock, SpikingMlp, make_attention
from .registry import build_model, register_model

__all__ = [
    "PatchEmbedInit",
    "PatchEmbedStage",
    "QKFormer",
    "qkformer_hst_2_256",
    "qkformer_hst_4_384",
    "qkformer_hst_10_768",
]

# stem kind -> ((width divisor, pool) per conv, index of the conv feeding the shortcut)
_STEMS: dict[str, tuple[tuple[tuple[int, bool], ...], int]] = {
    "cifar": (((2, False), (1, False)), 0),
    "dvs": (((8, False), (4, True), (2, True), (1, True)), 1),
    "imagenet": (((2, True), (1, True), (1, False)), 0),
}


class PatchEmbedInit(nn.Module):
    """QKFormer's first patch embedding: ``[T, B, C, H, W] -> [T, B, D, H / r, W / r]``."""

    def __init__(self, in_chans: int, embed_dim: int, kind: str, neuron: Neuron, *, stateful: bool = False):
        super().__init__()
        if kind not in _STEMS:
            raise ValueError(f"unknown stem {kind!r}; choose one of {', '.join(_STEMS)}")
        convs, self.shortcut_from = _STEMS[kind]
        if any(embed_dim % div for div, _ in convs):
            raise ValueError(f"embed_dim {embed_dim} must be divisible by {max(d for d, _ in convs)}")
        widths = [embed_dim // div for div, _ in convs]
        ins = [in_chans, *widths[:-1]]
        self.proj = nn.ModuleList(
            ConvBNLIF(i, o, neuron, pool="pre" if p else None, stateful=stateful)
            for i, o, (_, p) in zip(ins, widths, convs, strict=True)
        )
        stride = 2 ** sum(p for _, p in convs[self.shortcut_from + 1 :])
        self.shortcut = ConvBNLIF(
            widths[self.shortcut_from], embed_dim, neuron, kernel_size=1, stride=stride, stateful=stateful
        )
        self.reduction = 2 ** sum(p for _, p in convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = x
        for i, stage in enumerate(self.proj):
            x = stage(x)
            if i == self.shortcut_from:
                feat = x
        return x + self.shortcut(feat)


class PatchEmbedStage(nn.Module):
    """PEDS between stages: ``[T, B, D_in, H, W] -> [T, B, D_out, H / 2, W / 2]``."""

    def __init__(
        self, in_dim: int, out_dim: int, neuron: Neuron, pool_first: bool = False, *, stateful: bool = False
    ):
        super().__init__()
        self.proj = nn.ModuleList(
            [
                ConvBNLIF(in_dim, out_dim, neuron, pool="pre" if pool_first else None, stateful=stateful),
                ConvBNLIF(out_dim, out_dim, neuron, pool=None if pool_first else "pre", stateful=stateful),
            ]
        )
        self.shortcut = ConvBNLIF(in_dim, out_dim, neuron, kernel_size=1, stride=2, stateful=stateful)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for stage in self.proj:
            y = stage(y)
        return y + self.shortcut(x)


class QKFormer(SpikingBackbone):
    """Hierarchical spiking transformer; see the module docstring and :class:`SpikingBackbone`.

    ``embed_dims`` / ``depths`` / ``attn`` (and ``num_heads`` when a tuple) give one entry per stage;
    ``attn`` entries are keys of ``spikecore.models.layers.ATTENTION`` (ssa, sdsa, qkta, qkca,
    ff_lidiff, fb_lidiff). ``attn_scale`` applies to the SSA-style stages.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        T: int = 4,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 32,
        embed_dims: tuple[int, ...] = (96, 192, 384),
        depths: tuple[int, ...] = (1, 1, 2),
        num_heads: int | tuple[int, ...] = 8,
        mlp_ratio: float = 4.0,
        attn: tuple[str, ...] = ("qkta", "qkta", "ssa"),
        attn_scale: float = 0.125,
        stem: str = "cifar",
        drop_path_rate: float = 0.0,
        neuron: NeuronConfig | None = None,
        tau: float = UNSET,
        detach_reset: bool = UNSET,
        surrogate: str = UNSET,
        alpha: float | None = UNSET,
        backend: str = UNSET,
        stateful: bool = False,
    ):
        super().__init__(
            num_classes=num_classes,
            T=T,
            in_chans=in_chans,
            img_size=img_size,
            neuron=neuron,
            tau=tau,
            detach_reset=detach_reset,
            surrogate=surrogate,
            alpha=alpha,
            backend=backend,
            stateful=stateful,
        )
        n_stages = len(embed_dims)
        heads = (num_heads,) * n_stages if isinstance(num_heads, int) else tuple(num_heads)
        if not (len(depths) == len(attn) == len(heads) == n_stages) or n_stages < 1:
            raise ValueError(
                f"embed_dims {embed_dims}, depths {depths}, attn {attn} and num_heads {num_heads} "
                "need one entry per stage"
            )
        if min(depths) < 1:
            raise ValueError(f"every stage needs at least one block, got depths {depths}")
        st = self.stateful
        self.patch_embed = PatchEmbedInit(in_chans, embed_dims[0], stem, self.neuron, stateful=st)
        self.downsample.extend(
            PatchEmbedStage(d_in, d_out, self.neuron, pool_first=stem == "imagenet", stateful=st)
            for d_in, d_out in itertools.pairwise(embed_dims)
        )
        rates = iter(self.drop_path_rates(drop_path_rate, sum(depths)))
        side = (
            self.img_size[0] // self.patch_embed.reduction,
            self.img_size[1] // self.patch_embed.reduction,
        )
        for s, (dim, depth, kind, h) in enumerate(zip(embed_dims, depths, attn, heads, strict=True)):
            for _ in range(depth):
                attention = make_attention(kind, dim, h, self.neuron, scale=attn_scale, stateful=st)
                mlp = SpikingMlp(dim, int(dim * mlp_ratio), self.neuron, stateful=st)
                self.blocks.append(SpikingBlock(attention, mlp, next(rates)))
                self.block_stage.append(s)
                self.block_dims.append(dim)
                self.block_tokens.append(side[0] * side[1])
            side = ((side[0] + 1) // 2, (side[1] + 1) // 2)  # the 3x3/2 pool with padding 1 rounds up
        self.stage_attn = tuple(attn)
        self.head = nn.Linear(embed_dims[-1], num_classes)
        self.init_weights()

    def forward_stem(self, x_seq: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x_seq)


@register_model
def qkformer_hst_4_384(**overrides: Any) -> QKFormer:
    """HST-4-384 for CIFAR (32x32): QKTA @96 on 32x32, QKTA @192 on 16x16, 2 SSA @384 on 8x8; 8 heads;
    6.74M parameters at 10 classes."""
    defaults = dict(img_size=32, in_chans=3, num_classes=10, embed_dims=(96, 192, 384), depths=(1, 1, 2))
    return build_model(QKFormer, defaults, overrides)


@register_model
def qkformer_hst_2_256(**overrides: Any) -> QKFormer:
    """HST-2-256 for DVS (128x128x2, CIFAR10-DVS: 10 classes, T=16): two stages, QKTA @128 on 16x16 and
    SSA @256 on 8x8, 16 heads and MLP ratio 1 (both as the reference DVS code): 1.50M parameters."""
    defaults = dict(
        img_size=128,
        in_chans=2,
        num_classes=10,
        embed_dims=(128, 256),
        depths=(1, 1),
        attn=("qkta", "ssa"),
        num_heads=16,
        mlp_ratio=1.0,
        stem="dvs",
        T=16,
    )
    return build_model(QKFormer, defaults, overrides)


@register_model
def qkformer_hst_10_768(**overrides: Any) -> QKFormer:
    """HST-10-768 for ImageNet (224x224): 1 QKTA @192 on 56x56, 2 QKTA @384 on 28x28, 7 SSA @768 on
    14x14; 12 heads (SpiLiFormer's table for this backbone); 64.96M parameters at 1000 classes."""
    defaults = dict(
        img_size=224,
        in_chans=3,
        num_classes=1000,
        embed_dims=(192, 384, 768),
        depths=(1, 2, 7),
        num_heads=12,
        stem="imagenet",
    )
    return build_model(QKFormer, defaults, overrides)
