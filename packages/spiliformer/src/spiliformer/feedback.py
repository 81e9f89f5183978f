"""SpiLiFormer's feedback generator: from pass 1's last-stage spikes Z to one feedback map per FB block.

    m_i = clamp(cos(Z_token, p_i), 0, 1)         p1, p2 in R^C learnable prompts; one scalar per token
    Zf  = (Z * m1 - Z * m2) * aug                 aug: 1.0 (CIFAR-10, ImageNet, DVS), 2.0 (CIFAR-100)
    fb_k = Decoder_k(fb_prev),  Decoder = Linear(C, C, no bias) -> BN1d -> LIF   (DVS: no BN)

The decoders form a chain: ``"backward"`` (the CIFAR / DVS code) starts at the deepest FB block
(fb_K = Dec_K(Zf), fb_(K-1) = Dec_(K-1)(fb_K), ...), ``"forward"`` (the ImageNet code) at the first.
Shapes are tokens-last ``[T, B, C, N]``; every step t is decoded on its own (feedback at the same t).
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spikecore import LIF

DECODER_ORDERS = ("backward", "forward")


class FeedbackDecoder(nn.Module):
    """``LIF(BN(Linear(x)))`` over the channels of ``[T, B, C, N]`` (``bn=False``: ``LIF(Linear(x))``)."""

    def __init__(self, dim: int, bn: bool = True, neuron: dict[str, Any] | None = None):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim) if bn else None
        self.lif = LIF(v_threshold=1.0, v_reset=0.0, **(neuron or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, N = x.shape
        y = self.linear(x.transpose(2, 3)).transpose(2, 3)
        if self.bn is not None:
            y = self.bn(y.reshape(T * B, C, N)).reshape(T, B, C, N)
        return self.lif(y)


class FeedbackGenerator(nn.Module):
    """Prompts, cosine masks, the aug factor and the decoder chain (see the module docstring).

    Args:
        dim: C, the last stage's width.
        n_blocks: number of FB blocks (one decoder each).
        aug: the factor on the masked difference.
        order: ``"backward"`` or ``"forward"`` decoder chain.
        decoder_bn: BatchNorm in the decoders (the DVS code has none).
        neuron: LIF options of the decoders (the backbone's).
    """

    def __init__(
        self,
        dim: int,
        n_blocks: int,
        aug: float = 1.0,
        order: str = "backward",
        decoder_bn: bool = True,
        neuron: dict[str, Any] | None = None,
    ):
        super().__init__()
        if order not in DECODER_ORDERS:
            raise ValueError(f"decoder order must be one of {DECODER_ORDERS}, got {order!r}")
        if n_blocks < 1:
            raise ValueError(f"the feedback generator needs at least one FB block, got {n_blocks}")
        self.aug = aug
        self.order = order
        self.prompts = nn.Parameter(torch.randn(2, dim))
        self.decoders = nn.ModuleList(FeedbackDecoder(dim, decoder_bn, neuron) for _ in range(n_blocks))

    def masks(self, z: torch.Tensor) -> torch.Tensor:
        """``[2, T, B, 1, N]``: clamp(cos(Z_token, p_i), 0, 1); a silent token gets 0."""
        p = self.prompts.to(z.dtype)[:, None, None, :, None]  # [2, 1, 1, C, 1]
        return F.cosine_similarity(z.unsqueeze(0), p, dim=3, eps=1e-8).clamp(0, 1).unsqueeze(3)

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Feedback maps for the FB blocks, in block order, each shaped like ``z``."""
        m1, m2 = self.masks(z)
        fb = (z * m1 - z * m2) * self.aug
        steps = range(len(self.decoders))
        out: list[torch.Tensor] = [z] * len(self.decoders)
        for k in reversed(steps) if self.order == "backward" else steps:
            fb = self.decoders[k](fb)
            out[k] = fb
        return out

    def extra_repr(self) -> str:
        return f"aug={self.aug}, order={self.order}"
