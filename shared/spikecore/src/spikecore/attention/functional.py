"""Spiking attention cores on spike tensors in the tokens-last layout ``[T, B, C, N]``.

Conventions shared by every function here:

* Inputs ``q``, ``k``, ``v`` are ``[T, B, C, N]`` (time, batch, channels, tokens), usually binary spikes
  made by ``LIF(BN(Conv1d_1x1(x)))``. ``C = heads * d``; head ``h`` owns the contiguous channels
  ``h*d .. (h+1)*d - 1`` (heads concatenated on channels, exactly as the reference codes reshape
  ``[T, B, C, N] -> [T, B, heads, d, N]``).
* Every function applies the **attention LIF** itself (default V_th 0.5, tau 2, hard reset to 0,
  detach_reset True, sigmoid surrogate) and returns the **post-LIF** result ``[T, B, C, N]``, heads
  concatenated back on channels: for SSA / FB-LiDiff the attention LIF's spikes; for SDSA, QKTA, QKCA and
  FF-LiDiff the product of a spiking mask with a spike tensor (binary when the inputs are binary). None of
  them applies the output projection (Conv1d-BN-LIF), which belongs to the modules.
* The attention neuron is ``neuron``: a :class:`spikecore.NeuronConfig` run by
  ``spikecore.lif_multi_step`` (default :data:`ATTENTION_NEURON`: V_th 0.5, tau 2, hard reset to 0,
  detached reset, sigmoid surrogate), or a callable (e.g. a :class:`spikecore.LIF` module, so that a
  stateful neuron can carry its membrane across TDFormer segments). The older keyword options (``tau``,
  ``v_threshold``, ``detach_reset``, ``surrogate``, ``alpha``, ``backend``; ``v_reset`` for SDSA) are still
  accepted and set those fields over the default; with a NeuronConfig they are a ``TypeError`` (the
  settings given twice), with a callable they are not used (the callable is the neuron).
"""

import importlib.util
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..neuron.config import ATTENTION_NEURON, UNSET, NeuronConfig, neuron_from, neuron_keywords
from ..neuron.ops import _FUSED_DTYPES, BACKENDS, lif_multi_step
from ..neuron.surrogate import resolve

Neuron = NeuronConfig | Callable[[torch.Tensor], torch.Tensor]

__all__ = ["ATTENTION_NEURON", "fb_lidiff", "ff_lidiff", "qkca", "qkta", "sdsa", "split_heads", "ssa"]

SSA_ORDERS = ("auto", "qk_first", "kv_first")


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[T, B, C, N] -> [T, B, heads, C // heads, N]`` (a view when ``x`` is contiguous)."""
    if x.dim() != 4:
        raise ValueError(f"expected a [T, B, C, N] tensor, got shape {tuple(x.shape)}")
    heads = int(heads)
    T, B, C, N = x.shape
    if heads < 1 or C % heads:
        raise ValueError(f"channels C={C} must be divisible by heads={heads}")
    return x.reshape(T, B, heads, C // heads, N)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    T, B, H, d, N = x.shape
    return x.reshape(T, B, H * d, N)


def _check_same(name: str, a: torch.Tensor, ref: torch.Tensor) -> None:
    if a.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {tuple(a.shape)} but q has {tuple(ref.shape)}; both must be [T, B, C, N]"
        )


def _attention_neuron(neuron: Any, loose: dict[str, Any], where: str) -> Neuron:
    """The attention neuron: a callable as it is (the keyword options unused), else one NeuronConfig from
    ``neuron`` or the keyword options over :data:`ATTENTION_NEURON` (both: a ``TypeError``)."""
    if neuron is not None and not isinstance(neuron, NeuronConfig | Mapping):
        if not callable(neuron):
            raise TypeError(f"{where}: neuron must be a NeuronConfig or a callable, got {neuron!r}")
        return neuron
    return neuron_from(neuron, loose, ATTENTION_NEURON, where)


def _attn_lif(x: torch.Tensor, neuron: Neuron) -> torch.Tensor:
    """``neuron(x)`` for a callable, else ``lif_multi_step`` with the NeuronConfig's settings."""
    if isinstance(neuron, NeuronConfig):
        return lif_multi_step(x, neuron=neuron)[0]
    return neuron(x)


def ssa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    scale: float = 0.125,
    order: str = "auto",
    *,
    neuron: Neuron | None = None,
    tau: float = UNSET,
    v_threshold: float = UNSET,
    detach_reset: bool = UNSET,
    surrogate: str = UNSET,
    alpha: float | None = UNSET,
    backend: str = UNSET,
) -> torch.Tensor:
    """Spikformer's spiking self-attention: ``Y = LIF_0.5(Q K^T V * scale)`` per head, no softmax.

    In token-major notation (``Q_h`` is ``[N, d]``), ``order="qk_first"`` computes ``(Q_h K_h^T) V_h``
    (the ``N x N`` map, O(N^2 d), Spikformer's order) and ``order="kv_first"`` computes
    ``Q_h (K_h^T V_h)`` (a ``d x d`` map, O(N d^2), the linear order). ``"auto"`` takes the cheaper one
    (kv_first when ``N > d``). On binary inputs both products are integer counts, exact in float32 up to
    2^24 (float16 up to 2048, bfloat16 up to 256), and ``scale`` is applied last, so the orders agree
    exactly when the scale is a power of two. Returns the attention LIF's spikes ``[T, B, C, N]``.
    """
    if order not in SSA_ORDERS:
        raise ValueError(f"order must be one of {SSA_ORDERS}, got {order!r}")
    neuron = _attention_neuron(neuron, neuron_keywords(locals()), "ssa()")
    _check_same("k", k, q)
    _check_same("v", v, q)
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)  # [T, B, H, d, N]
    d, N = qh.shape[-2:]
    if order == "auto":
        order = "kv_first" if N > d else "qk_first"
    # Channel-major (as stored): Y_h = V_h K_h^T Q_h with V_h, K_h, Q_h of shape [d, N].
    if order == "qk_first":
        y = vh @ (kh.transpose(-2, -1) @ qh)  # [N, N] map: entry (j, i) = #channels where k_j and q_i fire
    else:
        y = (vh @ kh.transpose(-2, -1)) @ qh  # [d, d] map
    y = _merge_heads(y) * scale
    return _attn_lif(y, neuron)


def fb_lidiff(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    scale: float = 0.125,
    **neuron_options,
) -> torch.Tensor:
    """SpiLiFormer's FB-LiDiff core: SSA in the linear order, ``Y = LIF_0.5(Q (K^T V) * scale)``.

    The feedback enters through ``v`` (``V = LIF(BN(W_v X + W_v F))``, built by
    :class:`FBLiDiffAttention`), so the core is exactly :func:`ssa` with ``order="kv_first"``.
    Takes the same keyword neuron options as :func:`ssa`; returns the attention LIF's spikes.
    """
    return ssa(q, k, v, heads, scale, order="kv_first", **neuron_options)


def sdsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int = 1,
    *,
    neuron: Neuron | None = None,
    tau: float = UNSET,
    v_threshold: float = UNSET,
    detach_reset: bool = UNSET,
    surrogate: str = UNSET,
    alpha: float | None = UNSET,
    backend: str = UNSET,
    v_reset: float | None = UNSET,
) -> torch.Tensor:
    """Spike-driven self-attention (SDT v1): ``KV = LIF_0.5(sum_tokens K * V)`` per channel; ``Y = Q * KV``.

    ``KV`` is ``[T, B, C, 1]`` (one neuron per head-channel), broadcast over the tokens. The reduction is
    per channel, so ``heads`` does not change the result; it is only checked to divide ``C``. Returns
    ``Q * KV`` ``[T, B, C, N]`` (post-LIF). ``v_reset`` is the attention LIF's reset (``None``: soft).

    With a NeuronConfig neuron (``decay_input`` on), ``backend="triton"`` (or ``"auto"`` on CUDA tensors of
    one dtype among float32 / float16 / bfloat16) runs the fused Triton kernel
    (``spikecore.attention._triton``): the ``K * V`` reduction, the LIF over T and ``Q * KV`` in one
    launch, without the full-size ``K * V`` temporary; one launch for the backward too. A callable
    ``neuron`` always takes the PyTorch path.
    """
    neuron = _attention_neuron(neuron, neuron_keywords(locals()), "sdsa()")
    _check_same("k", k, q)
    _check_same("v", v, q)
    split_heads(q, heads)
    if isinstance(neuron, NeuronConfig) and neuron.decay_input and _use_fused_sdsa(q, k, v, neuron.backend):
        from . import _triton

        surr, alpha = resolve(neuron.surrogate, neuron.alpha)
        return _triton.sdsa_fused(
            q,
            k,
            v,
            tau=neuron.tau,
            v_threshold=neuron.v_threshold,
            v_reset=neuron.v_reset,
            detach_reset=neuron.detach_reset,
            surrogate_id=surr.id,
            alpha=alpha,
        )
    kv = (k * v).sum(dim=-1, keepdim=True)
    return q * _attn_lif(kv, neuron)


def _use_fused_sdsa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> bool:
    """Whether :func:`sdsa` takes the fused Triton kernel (no custom neuron is checked by the caller)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    same = q.dtype == k.dtype == v.dtype and q.device == k.device == v.device
    if backend == "auto":
        return (
            q.is_cuda and same and q.dtype in _FUSED_DTYPES and importlib.util.find_spec("triton") is not None
        )
    if backend != "triton":
        return False
    if not same:
        raise TypeError(
            "backend='triton' for sdsa needs q, k, v of one dtype on one device, got "
            f"{q.dtype}/{k.dtype}/{v.dtype} on {q.device}/{k.device}/{v.device}"
        )
    if q.dtype not in _FUSED_DTYPES:
        raise TypeError(
            f"backend='triton' takes float32, float16 or bfloat16 input, got {q.dtype}; "
            "use backend='torch' for float64"
        )
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import to run the "
            "kernels on the CPU for testing); use backend='auto' or 'cpu' for CPU tensors"
        )
    return True


def qkta(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: int,
    *,
    neuron: Neuron | None = None,
    tau: float = UNSET,
    v_threshold: float = UNSET,
    detach_reset: bool = UNSET,
    surrogate: str = UNSET,
    alpha: float | None = UNSET,
    backend: str = UNSET,
) -> torch.Tensor:
    """QKFormer token attention: ``A = LIF_0.5(sum over the head's d channels of Q)``; ``Y = A * K``.

    ``A`` is a token mask ``[T, B, heads, 1, N]`` broadcast over the head's channels. Returns ``Y``
    ``[T, B, C, N]`` (post-LIF), heads concatenated on channels.
    """
    neuron = _attention_neuron(neuron, neuron_keywords(locals()), "qkta()")
    _check_same("k", k, q)
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    a = _attn_lif(qh.sum(dim=3, keepdim=True), neuron)
    return _merge_heads(a * kh)


def qkca(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    neuron: Neuron | None = None,
    tau: float = UNSET,
    v_threshold: float = UNSET,
    detach_reset: bool = UNSET,
    surrogate: str = UNSET,
    alpha: float | None = UNSET,
    backend: str = UNSET,
) -> torch.Tensor:
    """QKFormer channel attention: ``A = LIF_0.5(sum over tokens of Q)`` ``[T, B, C, 1]``; ``Y = A * K``.

    Per channel, so heads play no role. Returns ``Y`` ``[T, B, C, N]`` (post-LIF).
    """
    neuron = _attention_neuron(neuron, neuron_keywords(locals()), "qkca()")
    _check_same("k", k, q)
    split_heads(q, 1)
    a = _attn_lif(q.sum(dim=-1, keepdim=True), neuron)
    return a * k


def ff_lidiff(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: int,
    *,
    neuron: Neuron | None = None,
    tau: float = UNSET,
    v_threshold: float = UNSET,
    detach_reset: bool = UNSET,
    surrogate: str = UNSET,
    alpha: float | None = UNSET,
    backend: str = UNSET,
) -> torch.Tensor:
    """SpiLiFormer's FF-LiDiff: token attention with lateral inhibition inside each head.

    The head's ``d`` channels are split into contiguous halves (channels ``0..d/2-1`` and ``d/2..d-1`` of
    the head); ``A = LIF_0.5(sum(Q first half) - sum(Q second half))`` is a token mask
    ``[T, B, heads, 1, N]``; ``Y = A * K``. Only tokens whose first half out-fires the second pass.
    ``d`` must be even. Returns ``Y`` ``[T, B, C, N]`` (post-LIF).
    """
    neuron = _attention_neuron(neuron, neuron_keywords(locals()), "ff_lidiff()")
    _check_same("k", k, q)
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    d = qh.shape[3]
    if d % 2:
        raise ValueError(f"ff_lidiff splits each head's channels in halves: head dim {d} must be even")
    diff = qh[:, :, :, : d // 2].sum(dim=3, keepdim=True) - qh[:, :, :, d // 2 :].sum(dim=3, keepdim=True)
    a = _attn_lif(diff, neuron)
    return _merge_heads(a * kh)
