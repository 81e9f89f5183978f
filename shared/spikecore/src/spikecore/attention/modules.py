"""Spiking attention modules that own their projections, built the way the reference models build them.

Layout: input ``x`` is ``[T, B, C, N]`` (or ``[T, B, C, *spatial]``, flattened to tokens and restored on
output), ``C = dim = num_heads * d``. Every projection branch ``p`` in (q, k, v) is

    p = p_lif( p_bn( p_conv(x) + p_extra ) )      p_conv = Conv1d(C, C, 1, bias=False), p_bn = BatchNorm1d(C)

with the conv and BN applied to the flattened ``(T*B, C, N)`` tensor, ``p_lif`` a :class:`spikecore.LIF`
(V_th ``v_threshold``, 1.0 by default). The attention core (``spikecore.attention.functional``) runs with
``attn_lif`` (V_th ``attn_v_threshold``, 0.5), then the output projection
``proj_lif(proj_bn(proj_conv(y)))`` with ``proj_conv = Conv1d(C, C, 1, bias=True)`` (SDSA: see its class).
Attribute names (``q_conv``, ``q_bn``, ``q_lif``, ..., ``attn_lif``, ``proj_conv``, ``proj_bn``,
``proj_lif``) follow the Spikformer / QKFormer / SDT reference codes, so their state dicts map by name.

Extension point for feedback (TDFormer control modules, SpiLiFormer feedback): ``forward`` takes optional
keyword tensors ``q_extra``, ``k_extra``, ``v_extra`` shaped like ``x``; each is added to that branch's
conv output **before** its BatchNorm (``K = LIF(BN(W_k X + k_extra))``). TDFormer's CM1 (TokenMix =
concat + 2D->D projection) is ``k_extra = W_td(S_td)`` with its own ``Conv1d(C, C, 1, bias=False)``; CM2 is
the same through ``v_extra``. Subclasses can instead override :meth:`project` (one branch) or
:meth:`attend` (the core).

The neuron, ``neuron=NeuronConfig(...)`` (default :data:`spikecore.BACKBONE_NEURON`: tau 2, V_th 1, hard
reset to 0, detached reset, sigmoid surrogate), is every LIF of the module; the attention-map neuron
``attn_lif`` is the same neuron with V_th ``attn_v_threshold`` (0.5). The older keyword options (``tau``,
``v_threshold``, ``detach_reset``, ``surrogate``, ``alpha``, ``backend``) are still accepted instead of
``neuron`` (not with it). ``stateful`` is the LIFs' state, not their dynamics: with ``stateful=True``
(TDFormer segments) the membranes carry over between calls: call ``spikecore.reset(model)`` between batches.
"""

import torch
from torch import nn

from ..neuron.config import BACKBONE_NEURON, UNSET, NeuronConfig, neuron_from, neuron_keywords
from ..neuron.module import LIF
from . import functional as F

__all__ = [
    "ChannelQKAttention",
    "FBLiDiffAttention",
    "FFLiDiffAttention",
    "SpikeDrivenSelfAttention",
    "SpikingSelfAttention",
    "TokenQKAttention",
]


class _SpikingAttention(nn.Module):
    """Common projections / neuron plumbing. Subclasses set ``branches`` and implement :meth:`attend`."""

    branches: tuple[str, ...] = ("q", "k", "v")
    has_proj_lif: bool = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        neuron: NeuronConfig | None = None,
        tau: float = UNSET,
        v_threshold: float = UNSET,
        attn_v_threshold: float = 0.5,
        detach_reset: bool = UNSET,
        surrogate: str = UNSET,
        alpha: float | None = UNSET,
        backend: str = UNSET,
        stateful: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.neuron = neuron_from(
            neuron, neuron_keywords(locals()), BACKBONE_NEURON, f"{type(self).__name__}()"
        )
        self.attn_v_threshold = attn_v_threshold
        self.stateful = stateful
        for name in self.branches:
            setattr(self, f"{name}_conv", nn.Conv1d(dim, dim, kernel_size=1, bias=False))
            setattr(self, f"{name}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{name}_lif", self.make_lif())
        self.attn_lif = self.make_lif(attn_v_threshold)
        self.proj_conv = nn.Conv1d(dim, dim, kernel_size=1, bias=True)
        self.proj_bn = nn.BatchNorm1d(dim)
        self.proj_lif = self.make_lif() if self.has_proj_lif else None

    def make_lif(self, v_threshold: float | None = None) -> LIF:
        """A :class:`spikecore.LIF` with this module's neuron (V_th ``v_threshold`` when given) and state."""
        neuron = self.neuron if v_threshold is None else self.neuron.replace(v_threshold=v_threshold)
        return LIF(neuron=neuron, stateful=self.stateful)

    # -- pieces -------------------------------------------------------------------------------------------
    @staticmethod
    def conv_bn(conv: nn.Module, bn: nn.Module, x: torch.Tensor, extra: torch.Tensor | None = None):
        """``bn(conv(x) + extra)`` over the flattened ``(T*B, C, N)``; returns ``[T, B, C', N]``."""
        T, B = x.shape[:2]
        y = conv(x.flatten(0, 1))
        if extra is not None:
            if extra.shape[:2] != x.shape[:2] or extra.shape[-1] != x.shape[-1] or extra.dim() != 4:
                raise ValueError(
                    f"extra input of shape {tuple(extra.shape)} does not match x {tuple(x.shape)}"
                )
            y = y + extra.flatten(0, 1)
        return bn(y).reshape(T, B, -1, x.shape[-1])

    def project(self, name: str, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Branch ``name`` (``"q"``, ``"k"``, ``"v"``): ``LIF(BN(Conv1d(x) + extra))``."""
        pre = self.conv_bn(getattr(self, f"{name}_conv"), getattr(self, f"{name}_bn"), x, extra)
        return getattr(self, f"{name}_lif")(pre)

    def attend(self, *qkv: torch.Tensor) -> torch.Tensor:
        # The one abstract hook: each attention form (subclass) supplies its core.
        raise NotImplementedError(f"{type(self).__name__} must implement attend(q, k[, v])")

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """Output projection ``proj_lif(proj_bn(proj_conv(y)))``."""
        y = self.conv_bn(self.proj_conv, self.proj_bn, y)
        return self.proj_lif(y) if self.proj_lif is not None else y

    # -- forward ------------------------------------------------------------------------------------------
    def _tokens(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        if x.dim() < 4 or x.shape[2] != self.dim:
            raise ValueError(
                f"{name} must be [T, B, C={self.dim}, N] (or [T, B, C, *spatial]), got {tuple(x.shape)}"
            )
        return x.flatten(3) if x.dim() > 4 else x

    def forward(
        self,
        x: torch.Tensor,
        *,
        q_extra: torch.Tensor | None = None,
        k_extra: torch.Tensor | None = None,
        v_extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = x.shape
        x = self._tokens(x)
        extras = {"q": q_extra, "k": k_extra, "v": v_extra}
        for name, e in extras.items():
            if e is not None and name not in self.branches:
                raise ValueError(f"{type(self).__name__} has no {name} branch; {name}_extra is not accepted")
        qkv = [
            self.project(n, x, None if extras[n] is None else self._tokens(extras[n], f"{n}_extra"))
            for n in self.branches
        ]
        return self.output(self.attend(*qkv)).reshape(shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


class SpikingSelfAttention(_SpikingAttention):
    """Spikformer's SSA: ``proj(LIF_0.5(Q K^T V * scale))``, Q/K/V = Conv1d-BN-LIF, no softmax.

    ``scale`` 0.125 (0.25 on DVS in Spikformer). ``order``: ``"qk_first"`` (Spikformer's ``(QK^T)V``),
    ``"kv_first"`` (linear ``Q(K^T V)``) or ``"auto"`` (the cheaper; identical results on spikes).
    """

    def __init__(self, dim: int, num_heads: int = 8, scale: float = 0.125, order: str = "auto", **options):
        super().__init__(dim, num_heads, **options)
        if order not in F.SSA_ORDERS:
            raise ValueError(f"order must be one of {F.SSA_ORDERS}, got {order!r}")
        self.scale = scale
        self.order = order

    def attend(self, q, k, v):
        return F.ssa(q, k, v, self.num_heads, self.scale, self.order, neuron=self.attn_lif)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, order={self.order}"


class FBLiDiffAttention(SpikingSelfAttention):
    """SpiLiFormer's FB-LiDiff: SSA in the linear order with ``V = LIF(BN(W_v X + W_v F))``.

    ``forward(x, feedback=None)``: ``feedback`` F (shaped like ``x``) goes through the same ``v_conv`` as
    ``x``; absent feedback gives exactly :class:`SpikingSelfAttention` (linear order) with the same weights.
    """

    def __init__(self, dim: int, num_heads: int = 8, scale: float = 0.125, **options):
        super().__init__(dim, num_heads, scale=scale, order="kv_first", **options)

    def forward(
        self,
        x: torch.Tensor,
        feedback: torch.Tensor | None = None,
        *,
        q_extra: torch.Tensor | None = None,
        k_extra: torch.Tensor | None = None,
        v_extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if feedback is not None:
            f = self._tokens(feedback, "feedback")
            fb = self.v_conv(f.flatten(0, 1)).reshape(f.shape)
            v_extra = fb if v_extra is None else self._tokens(v_extra, "v_extra") + fb
        return super().forward(x, q_extra=q_extra, k_extra=k_extra, v_extra=v_extra)


class SpikeDrivenSelfAttention(_SpikingAttention):
    """Spike-driven Transformer v1's SDSA block branch (MS_SSA_Conv), tokens-last.

    ``out = proj_bn(proj_conv(Q * LIF_0.5(sum_tokens K * V))) + x`` with Q/K/V = Conv1d-BN-LIF of
    ``shortcut_lif(x)``: the membrane shortcut of SDT v1 (LIF first in the branch, real-valued residual sum,
    no LIF after the projection). ``shortcut_lif=False`` drops the leading LIF (input already spikes) and
    ``residual=False`` returns the branch without adding ``x``.
    """

    has_proj_lif = False

    def __init__(
        self, dim: int, num_heads: int = 8, shortcut_lif: bool = True, residual: bool = True, **options
    ):
        super().__init__(dim, num_heads, **options)
        self.shortcut_lif = self.make_lif() if shortcut_lif else None
        self.residual = residual

    def fused_core(self, q: torch.Tensor) -> bool:
        """Whether :meth:`attend` takes the fused Triton SDSA core: on CUDA (or with backend="triton") and
        with a plain stateless attention LIF, whose options the kernel then takes over."""
        lif = self.attn_lif
        plain = not (lif.stateful or lif.store_v_seq) and lif.w is None and lif.decay_input
        return plain and (q.is_cuda or lif.backend == "triton")

    def attend(self, q, k, v):
        if not self.fused_core(q):
            return F.sdsa(q, k, v, self.num_heads, neuron=self.attn_lif)
        return F.sdsa(q, k, v, self.num_heads, neuron=self.attn_lif.neuron)

    def forward(
        self,
        x: torch.Tensor,
        *,
        q_extra: torch.Tensor | None = None,
        k_extra: torch.Tensor | None = None,
        v_extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        identity = x
        h = self.shortcut_lif(x) if self.shortcut_lif is not None else x
        out = super().forward(h, q_extra=q_extra, k_extra=k_extra, v_extra=v_extra)
        return out + identity if self.residual else out


class TokenQKAttention(_SpikingAttention):
    """QKFormer's Q-K token attention: ``proj(A * K)``, ``A = LIF_0.5(sum of Q over a head's channels)``."""

    branches = ("q", "k")

    def attend(self, q, k):
        return F.qkta(q, k, self.num_heads, neuron=self.attn_lif)


class ChannelQKAttention(_SpikingAttention):
    """QKFormer's Q-K channel attention: ``proj(A * K)``, ``A = LIF_0.5(sum of Q over tokens)``."""

    branches = ("q", "k")

    def attend(self, q, k):
        return F.qkca(q, k, neuron=self.attn_lif)


class FFLiDiffAttention(_SpikingAttention):
    """SpiLiFormer's FF-LiDiff: ``proj(A * K)``, ``A = LIF_0.5(sum(Q 1st half) - sum(Q 2nd half))`` per head.

    The head dim ``dim // num_heads`` must be even.
    """

    branches = ("q", "k")

    def __init__(self, dim: int, num_heads: int = 8, **options):
        super().__init__(dim, num_heads, **options)
        if self.head_dim % 2:
            raise ValueError(
                f"FF-LiDiff needs an even head dim, got {self.head_dim} (dim {dim}, heads {num_heads})"
            )

    def attend(self, q, k):
        return F.ff_lidiff(q, k, self.num_heads, neuron=self.attn_lif)
