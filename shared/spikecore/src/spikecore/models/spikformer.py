"""Spikformer (Zhou et al., ICLR 2023): SPS stem, SSA + spiking-MLP blocks, mean-pooled linear head.

Follows the reference code (github.com/ZK-Zhou/spikformer, ``cifar10/model.py`` and
``cifar10dvs/model.py``):

* SPS: four ``Conv3x3-BN-LIF`` with widths D/8, D/4, D/2, D, each optionally followed by a 3x3/2
  max-pool of its spikes (CIFAR: after the 3rd and 4th, 32x32 -> 8x8; DVS: after all four,
  128x128 -> 8x8), then the relative-position ``Conv3x3-BN-LIF`` added residually: ``x + rpe(x)``.
  ``pool_position="pre"`` pools the BN output before the LIF instead, as spikingjelly's ``Spikformer``
  does (the layout its model-zoo weights were trained in; see :mod:`spikecore.models.convert`).
* Blocks: ``x = x + SSA(x); x = x + MLP(x)`` (spiking residual sums), SSA scale 0.125 (0.25 on DVS).
* Head: mean over tokens then over T, then Linear.

The reference CIFAR code uses ``nn.Linear`` with bias for the Q/K/V projections; here they are the
shared bias-free ``Conv1d`` of :mod:`spikecore.attention` (3 * D parameters fewer per block).
"""

from typing import Any

import torch

from ..neuron.config import UNSET, NeuronConfig
from .base import SpikingBackbone
from .layers import ConvBNLIF, Neuron, SpikingBlock, SpikingMlp, make_attention
from .registry import build_model, register_model

__all__ = ["SPS", "Spikformer", "spikformer_2_256_dvs", "spikformer_4_384"]


class SPS(torch.nn.Module):
    """Spiking patch splitting: ``[T, B, C, H, W] -> [T, B, D, H / 2^p, W / 2^p]`` (p = pools)."""

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        pool_stages: tuple[bool, ...],
        neuron: Neuron,
        pool_position: str = "post",
        *,
        stateful: bool = False,
    ):
        super().__init__()
        if pool_position not in ("pre", "post"):
            raise ValueError(f"pool_position must be 'pre' or 'post', got {pool_position!r}")
        if len(pool_stages) != 4:
            raise ValueError(f"pool_stages needs one flag per stem conv (4), got {pool_stages}")
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be divisible by 8, got {embed_dim}")
        widths = (embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim)
        ins = (in_chans, *widths[:-1])
        self.proj = torch.nn.ModuleList(
            ConvBNLIF(i, o, neuron, pool=pool_position if p else None, stateful=stateful)
            for i, o, p in zip(ins, widths, pool_stages, strict=True)
        )
        self.rpe = ConvBNLIF(embed_dim, embed_dim, neuron, stateful=stateful)
        self.reduction = 2 ** sum(bool(p) for p in pool_stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.proj:
            x = stage(x)
        return x + self.rpe(x)


class Spikformer(SpikingBackbone):
    """Spikformer-``depth``-``embed_dim``; see the module docstring and :class:`SpikingBackbone`.

    ``pool_stages``: which SPS convs are followed by a max-pool; ``pool_position``: ``"post"`` pools their
    spikes (the reference code), ``"pre"`` their BN output before the LIF (spikingjelly). ``attn``: the
    attention kind of every block (``"ssa"``; any key of ``spikecore.models.layers.ATTENTION``).
    ``attn_scale``: SSA scale.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        T: int = 4,
        in_chans: int = 3,
        img_size: int | tuple[int, int] = 32,
        embed_dim: int = 384,
        depth: int = 4,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        pool_stages: tuple[bool, bool, bool, bool] = (False, False, True, True),
        pool_position: str = "post",
        attn: str = "ssa",
        attn_scale: float = 0.125,
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
        self.patch_embed = SPS(
            in_chans, embed_dim, tuple(pool_stages), self.neuron, pool_position, stateful=st
        )
        hidden = int(embed_dim * mlp_ratio)
        for rate in self.drop_path_rates(drop_path_rate, depth):
            attention = make_attention(attn, embed_dim, num_heads, self.neuron, scale=attn_scale, stateful=st)
            mlp = SpikingMlp(embed_dim, hidden, self.neuron, stateful=st)
            self.blocks.append(SpikingBlock(attention, mlp, rate))
        r = self.patch_embed.reduction
        self.block_stage = [0] * depth
        self.block_dims = [embed_dim] * depth
        self.block_tokens = [(self.img_size[0] // r) * (self.img_size[1] // r)] * depth
        self.head = torch.nn.Linear(embed_dim, num_classes)
        self.init_weights()

    def forward_stem(self, x_seq: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x_seq)


@register_model
def spikformer_4_384(**overrides: Any) -> Spikformer:
    """Spikformer-4-384 for CIFAR (32x32, 8x8 = 64 tokens, 12 heads): 9.32M parameters at 10 classes."""
    defaults = dict(img_size=32, in_chans=3, num_classes=10, embed_dim=384, depth=4, num_heads=12)
    return build_model(Spikformer, defaults, overrides)


@register_model
def spikformer_2_256_dvs(**overrides: Any) -> Spikformer:
    """Spikformer-2-256 for DVS (128x128x2, a max-pool after every SPS conv -> 8x8 tokens, 16 heads,
    SSA scale 0.25, 10 classes as CIFAR10-DVS): about 2.57M parameters. Input ``[T, B, 2, 128, 128]``."""
    defaults = dict(
        img_size=128,
        in_chans=2,
        num_classes=10,
        embed_dim=256,
        depth=2,
        num_heads=16,
        pool_stages=(True, True, True, True),
        attn_scale=0.25,
        T=16,
    )
    return build_model(Spikformer, defaults, overrides)
