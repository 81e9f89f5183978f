"""Building blocks the backbone families share: conv stages over ``[T, B, C, H, W]``, spiking MLPs, the
attention name table and the generic transformer block with its feedback extension point."""

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..attention.modules import (
    ChannelQKAttention,
    FBLiDiffAttention,
    FFLiDiffAttention,
    SpikeDrivenSelfAttention,
    SpikingSelfAttention,
    TokenQKAttention,
)
from ..neuron.config import NeuronConfig
from ..neuron.module import LIF
from .stochastic_depth import TimeMajorDropPath

__all__ = [
    "ATTENTION",
    "ConvBNLIF",
    "MembraneShortcutMlp",
    "SpikingBlock",
    "SpikingMlp",
    "make_attention",
    "make_lif",
    "seq_apply",
]

# Name -> attention module. Every class takes (dim, num_heads, neuron=..., stateful=...) and the q/k/v extras.
ATTENTION: dict[str, type[nn.Module]] = {
    "ssa": SpikingSelfAttention,
    "sdsa": SpikeDrivenSelfAttention,
    "qkta": TokenQKAttention,
    "qkca": ChannelQKAttention,
    "ff_lidiff": FFLiDiffAttention,
    "fb_lidiff": FBLiDiffAttention,
}
_SCALED = ("ssa", "fb_lidiff")  # the attention kinds with an SSA scale


# The layers below take the model's neuron, a NeuronConfig, and ``stateful`` (the LIFs' state). The older
# form, one mapping of LIF keyword options with ``stateful`` among them, is still accepted.
Neuron = NeuronConfig | Mapping[str, Any]


def _neuron_and_state(neuron: Neuron, stateful: bool) -> tuple[NeuronConfig, bool]:
    if isinstance(neuron, Mapping):  # the older form: LIF keyword options (defaults: LIF's)
        options = dict(neuron)
        stateful = bool(options.pop("stateful", stateful))
        return NeuronConfig.coerce(options), stateful
    return NeuronConfig.coerce(neuron), stateful


def make_lif(neuron: Neuron, v_threshold: float | None = None, *, stateful: bool = False) -> LIF:
    """A :class:`spikecore.LIF` with the model's neuron (V_th ``v_threshold`` when given)."""
    neuron, stateful = _neuron_and_state(neuron, stateful)
    if v_threshold is not None:
        neuron = neuron.replace(v_threshold=v_threshold)
    return LIF(neuron=neuron, stateful=stateful)


def make_attention(
    kind: str,
    dim: int,
    num_heads: int,
    neuron: Neuron,
    scale: float | None = None,
    *,
    stateful: bool = False,
) -> nn.Module:
    """Attention module ``kind`` (a key of :data:`ATTENTION`) with the model's neuron.

    ``scale`` applies to the SSA-style kinds only. SDSA is built without its own residual: the
    :class:`SpikingBlock` adds it, so that ``x_extra`` reaches the attention input but not the residual.
    An older-form mapping of neuron options is passed to the module as its keyword options.
    """
    if kind not in ATTENTION:
        raise ValueError(f"unknown attention kind {kind!r}; choose one of {', '.join(ATTENTION)}")
    if isinstance(neuron, Mapping):
        kwargs: dict[str, Any] = {"stateful": stateful, **neuron}
    else:
        kwargs = dict(neuron=NeuronConfig.coerce(neuron), stateful=stateful)
    if kind in _SCALED and scale is not None:
        kwargs["scale"] = scale
    if kind == "sdsa":
        kwargs["residual"] = False
    return ATTENTION[kind](dim, num_heads, **kwargs)


def seq_apply(x: torch.Tensor, *fns: nn.Module) -> torch.Tensor:
    """Apply per-frame modules to ``[T, B, ...]`` by folding time into the batch."""
    y = x.flatten(0, 1)
    for fn in fns:
        y = fn(y)
    return y.reshape(*x.shape[:2], *y.shape[1:])


class ConvBNLIF(nn.Module):
    """``Conv2d-BN[-MaxPool]-LIF[-MaxPool]`` over ``[T, B, C, H, W]``.

    ``pool``: ``None``, ``"pre"`` (3x3/2 max-pool of the BN output, before the LIF: QKFormer, SDT's last
    stem conv) or ``"post"`` (max-pool of the spikes: Spikformer's SPS, SDT's first stem convs).
    ``lif=False`` leaves out the neuron (the stage then returns real values).
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        neuron: Neuron,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        pool: str | None = None,
        lif: bool = True,
        stateful: bool = False,
    ):
        super().__init__()
        if pool not in (None, "pre", "post"):
            raise ValueError(f"pool must be None, 'pre' or 'post', got {pool!r}")
        if pool == "post" and not lif:
            raise ValueError("pool='post' pools the spikes and needs lif=True")
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1) if pool else None
        self.pool_position = pool
        self.lif = make_lif(neuron, stateful=stateful) if lif else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = x.shape[:2]
        y = self.bn(self.conv(x.flatten(0, 1)))
        if self.pool_position == "pre":
            y = self.pool(y)
        y = y.reshape(T, B, *y.shape[1:])
        if self.lif is not None:
            y = self.lif(y)
        if self.pool_position == "post":
            y = seq_apply(y, self.pool)
        return y


class SpikingMlp(nn.Module):
    """Spikformer / QKFormer MLP on tokens ``[T, B, C, N]``: two ``Conv1x1(bias)-BN-LIF`` layers."""

    def __init__(self, dim: int, hidden_dim: int, neuron: Neuron, *, stateful: bool = False):
        super().__init__()
        self.fc1_conv = nn.Conv1d(dim, hidden_dim, 1)
        self.fc1_bn = nn.BatchNorm1d(hidden_dim)
        self.fc1_lif = make_lif(neuron, stateful=stateful)
        self.fc2_conv = nn.Conv1d(hidden_dim, dim, 1)
        self.fc2_bn = nn.BatchNorm1d(dim)
        self.fc2_lif = make_lif(neuron, stateful=stateful)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1_lif(seq_apply(x, self.fc1_conv, self.fc1_bn))
        return self.fc2_lif(seq_apply(x, self.fc2_conv, self.fc2_bn))


class MembraneShortcutMlp(nn.Module):
    """SDT v1 MLP branch on tokens: ``BN(Conv1x1(LIF(BN(Conv1x1(LIF(x))))))``, LIF first in each layer.

    Returns the branch only; the block adds the real-valued residual.
    """

    def __init__(self, dim: int, hidden_dim: int, neuron: Neuron, *, stateful: bool = False):
        super().__init__()
        self.fc1_lif = make_lif(neuron, stateful=stateful)
        self.fc1_conv = nn.Conv1d(dim, hidden_dim, 1)
        self.fc1_bn = nn.BatchNorm1d(hidden_dim)
        self.fc2_lif = make_lif(neuron, stateful=stateful)
        self.fc2_conv = nn.Conv1d(hidden_dim, dim, 1)
        self.fc2_bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = seq_apply(self.fc1_lif(x), self.fc1_conv, self.fc1_bn)
        return seq_apply(self.fc2_lif(x), self.fc2_conv, self.fc2_bn)


class SpikingBlock(nn.Module):
    """Transformer block ``x = x + attn(x + x_extra); x = x + mlp(x)`` on tokens ``[T, B, D, N]``.

    The same residual form covers Spikformer / QKFormer (spiking branches, SEW-style sums) and SDT v1
    (membrane-shortcut branches that start with a LIF, real-valued sums). ``q_extra`` / ``k_extra`` /
    ``v_extra`` go to the attention module (added to that projection before its BN); ``x_extra`` is added
    to the attention input only; ``feedback`` goes to attention modules whose ``forward`` takes a
    ``feedback`` argument (FB-LiDiff). Extras are ``[T, B, D, N]`` (or ``[T, B, D, H, W]`` when ``x`` is).
    Spatial input ``[T, B, D, H, W]`` is accepted and returned in the same layout.

    ``drop_path`` is stochastic depth per sample: in training each branch (attention, MLP; drawn
    independently) of each sample is dropped with that probability at every time step alike, the kept ones
    scaled by ``1 / (1 - drop_path)`` (:class:`~spikecore.models.stochastic_depth.TimeMajorDropPath`).
    """

    def __init__(self, attn: nn.Module, mlp: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.drop_path_attn = TimeMajorDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path_mlp = TimeMajorDropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def branches(self) -> tuple[str, ...]:
        """The projections of the attention module that accept an extra input (e.g. ``("q", "k")``)."""
        return tuple(self.attn.branches)

    @property
    def accepts_feedback(self) -> bool:
        """Whether the attention module takes a ``feedback`` input (SpiLiFormer's FB-LiDiff)."""
        return "feedback" in inspect.signature(self.attn.forward).parameters

    def forward(
        self,
        x: torch.Tensor,
        *,
        q_extra: torch.Tensor | None = None,
        k_extra: torch.Tensor | None = None,
        v_extra: torch.Tensor | None = None,
        x_extra: torch.Tensor | None = None,
        feedback: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extras = {"q": q_extra, "k": k_extra, "v": v_extra}
        for name, extra in extras.items():
            if extra is not None and name not in self.branches:
                raise ValueError(
                    f"{type(self.attn).__name__} has branches {self.branches}: {name}_extra is not accepted"
                )
        shape = x.shape
        x = x.flatten(3) if x.dim() == 5 else x
        attn_in = x
        if x_extra is not None:
            if x_extra.shape != shape and x_extra.shape != x.shape:
                raise ValueError(f"x_extra of shape {tuple(x_extra.shape)} does not match x {tuple(shape)}")
            attn_in = x + x_extra.reshape(x.shape)
        kwargs = {f"{n}_extra": e for n, e in extras.items() if e is not None}
        if feedback is not None:
            if not self.accepts_feedback:
                raise ValueError(f"{type(self.attn).__name__} takes no feedback input")
            kwargs["feedback"] = feedback.flatten(3) if feedback.dim() == 5 else feedback
        x = x + self.drop_path_attn(self.attn(attn_in, **kwargs))
        x = x + self.drop_path_mlp(self.mlp(x))
        return x.reshape(shape)
