"""SpiLiFormer's feedback generator: from pass 1's last-stage spikes Z to one feedback map per FB block.

    m_i = clamp(cos(Z_token, p_i), 0, 1)         p1, p2 in R^C learnable prompts; one scalar per token
    Zf  = (Z * m1 - Z * m2) * aug                 aug: 1.0 (CIFAR-10, ImageNet, DVS), 2.0 (CIFAR-100)
    fb_k = Decoder_k(fb_prev)

A decoder is ``Linear(C, C, no bias) -> BN1d -> LIF`` (the CIFAR-10, N-Caltech101 and ImageNet code),
``BN1d -> Linear -> LIF`` (``bn_first``: the CIFAR-100 code) or ``Linear -> LIF`` (``bn=False``: the
CIFAR10-DVS code). The decoders form a chain: ``"backward"`` (the CIFAR / DVS code) starts at the deepest
FB block (fb_K = Dec_K(Zf), fb_(K-1) = Dec_(K-1)(fb_K), ...), ``"forward"`` (the ImageNet code) at the first.
Shapes are tokens-last ``[T, B, C, N]``; every step t is decoded on its own (feedback at the same t).

``authors_reshape`` reproduces the authors' CIFAR-10 / CIFAR10-DVS / N-Caltech101 decoder, whose last
step reinterprets the token-major ``[N, C]`` spikes of each sample and step as ``[C, N]`` (a reshape where
a transpose was meant), so that feedback channel c of token n is not the decoded value of (c, n).
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spikecore import LIF, NeuronConfig

DECODER_ORDERS = ("backward", "forward")


class FeedbackDecoder(nn.Module):
    """``LIF(BN(Linear(x)))`` over the channels of ``[T, B, C, N]``.

    Args:
        dim: C.
        bn: BatchNorm1d in the decoder (``False``: ``LIF(Linear(x))``).
        neuron: the LIF's :class:`spikecore.NeuronConfig` (the backbone's ``neuron``), read as every
            spikecore layer and TDFormer's processing module read it; ``None``: NeuronConfig's defaults.
            (The older form, a mapping of LIF keyword options with ``stateful`` among them, still works.)
        bn_first: ``LIF(Linear(BN(x)))`` instead (the CIFAR-100 code).
        authors_reshape: the authors' final reshape (see the module docstring); off by default.
        stateful: the LIF's state (the backbone's ``stateful``).

    The Linear weight is initialised trunc-normal(std 0.02), as the reference code's ``_init_weights``.
    """

    def __init__(
        self,
        dim: int,
        bn: bool = True,
        neuron: NeuronConfig | Mapping[str, Any] | None = None,
        bn_first: bool = False,
        authors_reshape: bool = False,
        *,
        stateful: bool = False,
    ):
        super().__init__()
        if bn_first and not bn:
            raise ValueError("decoder_bn_first puts the decoder's BatchNorm first, but decoder_bn is off")
        self.linear = nn.Linear(dim, dim, bias=False)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        self.bn = nn.BatchNorm1d(dim) if bn else None
        self.bn_first = bn_first
        self.authors_reshape = authors_reshape
        if isinstance(neuron, Mapping):  # the older form: LIF keyword options
            options = dict(neuron)
            stateful = bool(options.pop("stateful", stateful))
            neuron = NeuronConfig.coerce(options)
        self.lif = LIF(neuron=neuron or NeuronConfig(), stateful=stateful)

    def _bn(self, y: torch.Tensor) -> torch.Tensor:
        T, B, C, N = y.shape
        return self.bn(y.reshape(T * B, C, N)).reshape(T, B, C, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, N = x.shape
        y = self._bn(x) if self.bn is not None and self.bn_first else x
        y = self.linear(y.transpose(2, 3)).transpose(2, 3)
        if self.bn is not None and not self.bn_first:
            y = self._bn(y)
        s = self.lif(y)
        if self.authors_reshape:  # the [N, C] spikes of each (t, b) read as [C, N]
            s = s.transpose(2, 3).contiguous().reshape(T, B, C, N)
        return s

    def extra_repr(self) -> str:
        return f"bn_first={self.bn_first}, authors_reshape={self.authors_reshape}"


class FeedbackGenerator(nn.Module):
    """Prompts, cosine masks, the aug factor and the decoder chain (see the module docstring).

    Args:
        dim: C, the last stage's width.
        n_blocks: number of FB blocks (one decoder each).
        aug: the factor on the masked difference.
        order: ``"backward"`` or ``"forward"`` decoder chain.
        decoder_bn: BatchNorm in the decoders (the CIFAR10-DVS code has none).
        neuron: the decoders' NeuronConfig (the backbone's).
        decoder_bn_first: ``BN -> Linear -> LIF`` decoders (the CIFAR-100 code).
        authors_reshape: the authors' decoder reshape (see the module docstring).
        stateful: the decoders' LIF state (the backbone's).
    """

    def __init__(
        self,
        dim: int,
        n_blocks: int,
        aug: float = 1.0,
        order: str = "backward",
        decoder_bn: bool = True,
        neuron: NeuronConfig | Mapping[str, Any] | None = None,
        decoder_bn_first: bool = False,
        authors_reshape: bool = False,
        *,
        stateful: bool = False,
    ):
        super().__init__()
        if order not in DECODER_ORDERS:
            raise ValueError(f"decoder order must be one of {DECODER_ORDERS}, got {order!r}")
        if n_blocks < 1:
            raise ValueError(f"the feedback generator needs at least one FB block, got {n_blocks}")
        self.aug = aug
        self.order = order
        self.prompts = nn.Parameter(torch.randn(2, dim))
        self.decoders = nn.ModuleList(
            FeedbackDecoder(dim, decoder_bn, neuron, decoder_bn_first, authors_reshape, stateful=stateful)
            for _ in range(n_blocks)
        )

    def masks(self, z: torch.Tensor) -> torch.Tensor:
        """``[2, T, B, 1, N]``: clamp(cos(Z_token, p_i), 0, 1) as ``normalize(Z_token) . normalize(p_i)``;
        a silent token gets 0."""
        zn = F.normalize(z, dim=2)  # [T, B, C, N], each token a unit vector (or 0)
        p = F.normalize(self.prompts.to(z.dtype), dim=1)  # [2, C]
        return torch.einsum("tbcn,kc->ktbn", zn, p).clamp(0, 1).unsqueeze(3)

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
