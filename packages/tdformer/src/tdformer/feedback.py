"""TDFormer's feedback path: the processing module (PM) and the control modules (CM1-CM3).

Shapes are tokens-last, ``[T', B, D, N]`` for one segment of T' steps:

    S_td^(n) = PM(H_n)                 H_n: the last block's output on segment n
    block i of segment n+1 gets        CM1: K = LIF(BN(W_k S_bu + W_td S_td))     (default)
                                       CM2: V = LIF(BN(W_v S_bu + W_td S_td))
                                       CM3: attention input S_bu + W_td S_td

CM1's "TokenMix = concatenation on channels, then the 2D -> D K projection" is exactly
``W_k S_bu + W_td S_td`` with ``[W_k | W_td]`` the 2D -> D matrix: one extra D x D per feedback block, as the
paper's parameter counts say. Segment 1 has no feedback: its S_td half is zeros, i.e. no extra term.
"""

import torch
from torch import nn

from spikecore import BACKBONE_NEURON, LIF, NeuronConfig
from spikecore.neuron.config import UNSET, neuron_from, neuron_keywords

CONTROLS = {"cm1": "k_extra", "cm2": "v_extra", "cm3": "x_extra"}
CHANNEL_MIXERS = ("depthwise", "dense", "none")


class ControlModule(nn.Module):
    """The top-down term of one block: ``W_td S_td`` (Conv1d 1x1, D -> D, no bias) into K, V or the input."""

    def __init__(self, dim: int, control: str = "cm1"):
        super().__init__()
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {', '.join(CONTROLS)}, got {control!r}")
        self.control = control
        self.proj = nn.Conv1d(dim, dim, kernel_size=1, bias=False)

    def forward(self, s_td: torch.Tensor) -> dict[str, torch.Tensor]:
        t, b = s_td.shape[:2]
        y = self.proj(s_td.flatten(0, 1)).reshape(s_td.shape)
        return {CONTROLS[self.control]: y.reshape(t, b, *s_td.shape[2:])}

    def extra_repr(self) -> str:
        return f"control={self.control}"


class ProcessingModule(nn.Module):
    """PM "v1": a spatial-wise token mixer, then a channel-wise mixer.

    Token mixer: ``M[t, n] = clamp(sum_c W_c X[t, c, n], b, a)`` (learned ``W`` in R^D, cost O(N D)), then
    ``O = LIF(X * M)`` with M broadcast over channels. The clamp replaces the QK scale (b = 0, a in [1, 2];
    a = 2 by default, so a token at full mixer response fires in one step). ``W`` starts at ``4 / D``: M
    reaches 1 when a quarter of a token's channels are active.

    Neurons: both LIFs (token and channel mixer) are ``neuron``, a :class:`spikecore.NeuronConfig`, read as
    every spikecore layer and SpiLiFormer's decoders read it (the older keyword options ``tau``,
    ``v_threshold``, ``v_reset`` (``None``: soft reset), ``detach_reset``, ``surrogate``, ``alpha``,
    ``backend`` still set its fields instead), and ``stateful``. The default is
    :data:`spikecore.BACKBONE_NEURON`, the backbones' neuron as the paper gives it (tau 2, V_th 1, hard reset
    to 0, detached reset, sigmoid surrogate with alpha 4):

        H[t] = V[t-1] + (I[t] - (V[t-1] - V_reset)) / tau,   S[t] = Theta(H[t] - V_th),
        V[t] = H[t] (1 - S[t]) + V_reset S[t]   (hard reset; soft, v_reset=None: V[t] = H[t] - V_th S[t])

    Channel mixer (``channel_mixer``): ``"depthwise"`` (default) a per-channel 1x1 conv + BN + LIF;
    ``"dense"`` a full D x D 1x1 conv + BN + LIF; ``"none"``. The paper names a "Linear + BN + LIF" channel
    mixer but its parameter counts (e.g. QKFormer HST-10-768: 64.96M -> 65.55M with one feedback block,
    exactly one 768 x 768 matrix) leave no room for a second dense D x D, so the default is the per-channel
    form; ``"dense"`` is there to try the other reading.
    """

    def __init__(
        self,
        dim: int,
        clamp_min: float = 0.0,
        clamp_max: float = 2.0,
        channel_mixer: str = "depthwise",
        *,
        neuron: NeuronConfig | None = None,
        tau: float = UNSET,
        v_threshold: float = UNSET,
        v_reset: float | None = UNSET,
        detach_reset: bool = UNSET,
        surrogate: str = UNSET,
        alpha: float | None = UNSET,
        backend: str = UNSET,
        stateful: bool = False,
    ):
        super().__init__()
        self.neuron = neuron_from(neuron, neuron_keywords(locals()), BACKBONE_NEURON, "ProcessingModule()")
        if channel_mixer not in CHANNEL_MIXERS:
            raise ValueError(
                f"channel_mixer must be one of {', '.join(CHANNEL_MIXERS)}, got {channel_mixer!r}"
            )
        if not clamp_max > clamp_min:
            raise ValueError(f"PM clamp needs clamp_max > clamp_min, got ({clamp_min}, {clamp_max})")
        self.clamp_min, self.clamp_max = clamp_min, clamp_max
        self.token_weight = nn.Parameter(torch.full((dim,), 4.0 / dim))
        self.token_lif = LIF(neuron=self.neuron, stateful=stateful)
        self.channel_mixer = channel_mixer
        if channel_mixer != "none":
            groups = dim if channel_mixer == "depthwise" else 1
            self.channel_conv = nn.Conv1d(dim, dim, kernel_size=1, groups=groups, bias=False)
            self.channel_bn = nn.BatchNorm1d(dim)
            self.channel_lif = LIF(neuron=self.neuron, stateful=stateful)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[T', B, D, N]`` (spikes or real-valued block output) -> ``[T', B, D, N]`` spikes."""
        m = torch.einsum("tbcn,c->tbn", x, self.token_weight.to(x.dtype)).clamp(
            self.clamp_min, self.clamp_max
        )
        out = self.token_lif(x * m.unsqueeze(2))
        if self.channel_mixer == "none":
            return out
        y = self.channel_bn(self.channel_conv(out.flatten(0, 1))).reshape(out.shape)
        return self.channel_lif(y)

    def extra_repr(self) -> str:
        return f"clamp=({self.clamp_min}, {self.clamp_max}), channel_mixer={self.channel_mixer}"
