"""The plain PyTorch loop of the LIF equations: the oracle every fused backend is tested against.

It is also ``backend="torch"``. Arithmetic is done in float32 (float64 stays float64); the gradients come
from autograd through the loop, with the surrogate standing in for the Heaviside's derivative.
"""

from collections.abc import Callable

import torch

from .surrogate import heaviside


def check_tau_shape(tau: torch.Tensor, neuron_shape: torch.Size) -> None:
    """The tau shapes every backend takes: one that broadcasts to the neuron shape ``x.shape[1:]`` without
    adding dimensions (``tau.expand(x.shape[1:])`` works): a 0-d tensor, one per neuron, or e.g. one per
    channel ``[C, 1, 1]`` of ``[T, B, C, H, W]`` input. Anything else (a per-time-step ``[T, ...]`` tau, a
    leading batch dimension the neuron shape lacks) would change the output's shape, so it is refused."""
    if tau.dim() <= len(neuron_shape):
        try:
            tau.expand(neuron_shape)
            return
        except RuntimeError:
            pass
    raise ValueError(
        f"tau of shape {tuple(tau.shape)} does not broadcast to the neuron shape {tuple(neuron_shape)} "
        "(x.shape[1:]); a tensor tau must be 0-d or broadcast to x.shape[1:] without extra dimensions "
        "(one value per neuron or per channel; a per-time-step [T, ...] tau is not supported)"
    )


def lif_reference(
    x: torch.Tensor,
    v_init: torch.Tensor | None = None,
    *,
    tau: float | torch.Tensor = 2.0,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
    surrogate: str = "sigmoid",
    alpha: float | None = None,
    store_v_seq: bool = False,
    spike_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
):
    """Run the LIF equations step by step.

    Returns ``(spikes, v_final)`` or ``(spikes, v_final, v_seq)``; spikes in x's dtype, v in the
    compute dtype (float32, or float64 for float64 input). ``spike_fn`` replaces the Heaviside (the
    gradient checks pass a smooth primitive here). A tensor ``tau`` must broadcast to ``x.shape[1:]``
    (:func:`check_tau_shape`), so the outputs always have x's shape; its values are not checked here (the
    oracle runs whatever it is given): ``lif_multi_step`` refuses a tau that is not > 0.
    """
    if isinstance(tau, torch.Tensor):
        check_tau_shape(tau, x.shape[1:])
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute)
    if spike_fn is None:

        def spike_fn(z):
            return heaviside(z, surrogate, alpha)

    v = torch.zeros_like(xc[0]) if v_init is None else v_init.to(compute).expand_as(xc[0])
    tau_c = tau.to(compute) if isinstance(tau, torch.Tensor) else tau
    decay_reset = 0.0 if v_reset is None else v_reset
    spikes, vs = [], []
    for t in range(xc.shape[0]):
        if decay_input:
            h = v + (xc[t] - (v - decay_reset)) / tau_c
        else:
            h = v - (v - decay_reset) / tau_c + xc[t]
        s = spike_fn(h - v_threshold)
        s_reset = s.detach() if detach_reset else s
        if v_reset is None:
            v = h - s_reset * v_threshold
        else:
            v = s_reset * v_reset + (1 - s_reset) * h
        spikes.append(s)
        if store_v_seq:
            vs.append(v)
    out = torch.stack(spikes).to(x.dtype)
    if store_v_seq:
        return out, v, torch.stack(vs)
    return out, v
