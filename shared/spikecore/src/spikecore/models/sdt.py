"""Spike-driven Transformer v1 (Yao et al., NeurIPS 2023): membrane-shortcut blocks with SDSA.

Follows the reference code (github.com/BICLab/Spike-Driven-Transformer, ``module/sps.py``,
``module/ms_conv.py``, ``model/spikeformer.py``):

* Stem (MS_SPS): ``Conv3x3-BN-LIF`` at D/8, D/4, D/2, each optionally followed by a 3x3/2 max-pool of its
  spikes, then ``Conv3x3-BN`` to D (optionally max-pooled) giving the real-valued ``x``; the
  relative-position branch ``BN(Conv3x3(LIF(x)))`` is added: ``x + rpe(x)``. ``pooling_stat`` is the
  reference's four-character mask ("0011" CIFAR: 32 -> 8; "0111" DVS128 Gesture: 128 -> 16).
* Blocks (membrane shortcut, real-valued residual stream): ``x = x + SDSA(x)`` with SDSA's leading LIF,
  ``x = x + BN(Conv1x1(LIF(BN(Conv1x1(LIF(x))))))``.
* Head: mean over tokens, LIF, Linear, mean over T.

Not reproduced: the reference's ``dvs_mode`` ("Erode" 3x3 max-pools inside SDSA; parameter-free and off
in its configs' default) and its unused ``talking_heads`` conv (num_heads^2 parameters per block).
"""

from typing import Any

import torch
from torch import nn

from ..neuron.config import UNSET, NeuronConfig
from .base import SpikingBackbone
from .layers import ConvBNLIF, MembraneShortcutMlp, Neuron, SpikingBlock, make_attention, make_lif, seq_apply
from .registry import build_model, register_model

__all__ = ["MSPatchEmbed", "SpikeDrivenTransformer", "sdt_2_256", "sdt_2_512"]


class MSPatchEmbed(nn.Module):
    """SDT's stem: ``[T, B, C, H, W] -> [T, B, D, H / 2^p, W / 2^p]`` real-valued (p = ones in the mask)."""

    def __init__(
        self, in_chans: int, embed_dim: int, pooling_stat: str, neuron: Neuron, *, stateful: bool = False
    ):
        super().__init__()
        if len(pooling_stat) != 4 or set(pooling_stat) - {"0", "1"}:
            raise ValueError(f"pooling_stat must be a four-character 0/1 mask, got {pooling_stat!r}")
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be divisible by 8, got {embed_dim}")
        widths = (embed_dim // 8, embed_dim // 4, embed_dim // 2)
        ins = (in_chans, *widths[:-1])
        pools = [p == "1" for p in pooling_stat]
        self.proj = nn.ModuleList(
            ConvBNLIF(i, o, neuron, pool="post" if p else None, stateful=stateful)
            for i, o, p in zip(ins, widths, pools[:3], strict=True)
        )
        self.proj_final = ConvBNLIF(
            widths[-1], embed_dim, neuron, pool="pre" if pools[3] else None, lif=False, stateful=stateful
        )
        self.rpe_lif = make_lif(neuron, stateful=stateful)
        self.rpe_conv = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(embed_dim)
        self.reduction = 2 ** sum(pools)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.proj:
            x = stage(x)
        x = self.proj_final(x)
        return x + seq_apply(self.rpe_lif(x), self.rpe_conv, self.rpe_bn)


class SpikeDrivenTransformer(SpikingBackbone):
    """SDT v1 ``depth``-``embed_dim``; see the module docstring and :class:`SpikingBackbone`.

    The features (block outputs) are the real-valued membrane-shortcut sums, not spikes.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        T: int = 4,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 32,
        embed_dim: int = 512,
        depth: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        pooling_stat: str = "0011",
        attn: str = "sdsa",
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
        st = self.stateful
        self.patch_embed = MSPatchEmbed(in_chans, embed_dim, pooling_stat, self.neuron, stateful=st)
        hidden = int(embed_dim * mlp_ratio)
        for rate in self.drop_path_rates(drop_path_rate, depth):
            attention = make_attention(attn, embed_dim, num_heads, self.neuron, stateful=st)
            mlp = MembraneShortcutMlp(embed_dim, hidden, self.neuron, stateful=st)
            self.blocks.append(SpikingBlock(attention, mlp, rate))
        r = self.patch_embed.reduction
        self.block_stage = [0] * depth
        self.block_dims = [embed_dim] * depth
        self.block_tokens = [(self.img_size[0] // r) * (self.img_size[1] // r)] * depth
        self.head_lif = self.make_lif()
        self.head = nn.Linear(embed_dim, num_classes)
        self.init_weights()

    def forward_stem(self, x_seq: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x_seq)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """SDT's head: mean over tokens, LIF, Linear, mean over T."""
        return self.head(self.head_lif(features.mean(dim=-1))).mean(dim=0)


@register_model
def sdt_2_512(**overrides: Any) -> SpikeDrivenTransformer:
    """SDT-2-512 for CIFAR (32x32, pooling "0011" -> 8x8 tokens, 8 heads, 10 classes): about 10.28M."""
    defaults = dict(img_size=32, in_chans=3, num_classes=10, embed_dim=512, depth=2, pooling_stat="0011")
    return build_model(SpikeDrivenTransformer, defaults, overrides)


@register_model
def sdt_2_256(**overrides: Any) -> SpikeDrivenTransformer:
    """SDT-2-256 for DVS128 Gesture (128x128x2, pooling "0111" -> 16x16 tokens, 8 heads, T=16).

    11 classes: the TDFormer table reports this backbone (2.57M) on DVS128 Gesture, as does the SDT
    paper; pass ``num_classes=10`` for CIFAR10-DVS (256 parameters fewer).
    """
    defaults = dict(
        img_size=128, in_chans=2, num_classes=11, embed_dim=256, depth=2, pooling_stat="0111", T=16
    )
    return build_model(SpikeDrivenTransformer, defaults, overrides)
