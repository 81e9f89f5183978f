"""``lif_multi_step``: validation, backend choice, and the fused op registered with ``torch.library``.

The fused backends (``_cpu``: C++ kernels, numba where they cannot be built; ``_triton``: Triton) implement
one contract on flattened tensors, so the autograd and ``torch.compile`` plumbing here is written once:

``lif_fwd(x[T,N], v_init[N] f32 | None, tau_t[N] f32 | None, tau, v_th, v_reset, soft, decay_input,
          store_v_seq)``
    -> ``spikes[T,N]`` (x's dtype), ``v_final[N]`` f32, ``v_seq[T,N]`` f32 (``[0]`` when not stored),
    ``saved[K,N]`` f32 (membrane checkpoints the backward needs, ``K = n_saved(T)``, may be 0).
``lif_bwd(grad_s[T,N], grad_v[N] f32 | None, x, v_init, tau_t, saved, tau, v_th, v_reset, soft, decay_input,
          detach_reset, surrogate_id, alpha, need_grad_tau)``
    -> ``grad_x[T,N]`` (x's dtype), ``grad_v_init[N]`` f32 (``[0]`` when ``v_init`` is None), ``grad_tau[N]``
    f32 (``[0]`` when not asked).

``None`` for ``v_init`` / ``grad_v`` means zeros (each backend makes or skips them), so only ``x`` (in its
own dtype), ``v_init`` (when the caller gave one) and the few checkpoints are saved for backward; the
membrane is recomputed there. ``tau_t`` (per-neuron tau, PLIF) overrides the float ``tau`` when given.
"""

import functools
import importlib
import os

import torch

from .config import BACKENDS, UNSET, NeuronConfig, neuron_keywords, neuron_options
from .reference import check_tau_shape, lif_reference
from .surrogate import resolve

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _backend_module(name: str):
    return importlib.import_module(f"spikecore.neuron._{name}")  # once: import_module cost ~3 us a call


@torch.library.custom_op("spikecore::lif_fwd", mutates_args=())
def _lif_fwd(
    x: torch.Tensor,
    v_init: torch.Tensor | None,
    tau_t: torch.Tensor | None,
    tau: float,
    v_th: float,
    v_reset: float,
    soft: bool,
    decay_input: bool,
    detach_reset: bool,
    surrogate_id: int,
    alpha: float,
    store_v_seq: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # detach_reset, surrogate_id and alpha only shape the backward; they are inputs here so that the
    # autograd context gets them without any state outside the op.
    return _backend_module(backend).lif_fwd(
        x, v_init, tau_t, tau, v_th, v_reset, soft, decay_input, store_v_seq
    )


@_lif_fwd.register_fake
def _lif_fwd_fake(
    x,
    v_init,
    tau_t,
    tau,
    v_th,
    v_reset,
    soft,
    decay_input,
    detach_reset,
    surrogate_id,
    alpha,
    store_v_seq,
    backend,
):
    T, N = x.shape
    v_seq = x.new_empty((T, N) if store_v_seq else (0,), dtype=torch.float32)
    saved = x.new_empty((_backend_module(backend).n_saved(T), N), dtype=torch.float32)
    return torch.empty_like(x), x.new_empty((N,), dtype=torch.float32), v_seq, saved


@torch.library.custom_op("spikecore::lif_bwd", mutates_args=())
def _lif_bwd(
    grad_s: torch.Tensor,
    grad_v: torch.Tensor | None,
    x: torch.Tensor,
    v_init: torch.Tensor | None,
    tau_t: torch.Tensor | None,
    saved: torch.Tensor,
    tau: float,
    v_th: float,
    v_reset: float,
    soft: bool,
    decay_input: bool,
    detach_reset: bool,
    surrogate_id: int,
    alpha: float,
    need_grad_tau: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backend_module(backend).lif_bwd(
        grad_s,
        grad_v,
        x,
        v_init,
        tau_t,
        saved,
        tau,
        v_th,
        v_reset,
        soft,
        decay_input,
        detach_reset,
        surrogate_id,
        alpha,
        need_grad_tau,
    )


@_lif_bwd.register_fake
def _lif_bwd_fake(
    grad_s,
    grad_v,
    x,
    v_init,
    tau_t,
    saved,
    tau,
    v_th,
    v_reset,
    soft,
    decay_input,
    detach_reset,
    surrogate_id,
    alpha,
    need_grad_tau,
    backend,
):
    N = x.shape[1]
    grad_tau = x.new_empty((N,) if need_grad_tau else (0,), dtype=torch.float32)
    grad_v_init = x.new_empty((N,) if v_init is not None else (0,), dtype=torch.float32)
    return torch.empty_like(x), grad_v_init, grad_tau


def _setup_context(ctx, inputs, output):
    x, v_init, tau_t, *params, _store_v_seq, backend = inputs
    ctx.save_for_backward(x, v_init, tau_t, output[3])
    # Unused outputs (v_final, v_seq, the checkpoints) get None, not zero tensors of N floats each.
    ctx.set_materialize_grads(False)
    ctx.params = tuple(params)  # tau, v_th, v_reset, soft, decay_input, detach_reset, surrogate_id, alpha
    ctx.backend = backend


def _backward_with(lif_bwd, ctx, grad_s, grad_v):
    x, v_init, tau_t, saved = ctx.saved_tensors
    grad_s = torch.zeros_like(x) if grad_s is None else grad_s.to(x.dtype).contiguous()
    grad_v = None if grad_v is None else grad_v.float().contiguous()
    need_grad_tau = tau_t is not None and ctx.needs_input_grad[2]
    grad_x, grad_v_init, grad_tau = lif_bwd(
        grad_s, grad_v, x, v_init, tau_t, saved, *ctx.params, need_grad_tau, ctx.backend
    )
    grad_v_init = grad_v_init if v_init is not None else None
    return grad_x, grad_v_init, (grad_tau if need_grad_tau else None)


def _backward(ctx, grad_s, grad_v, _grad_v_seq, _grad_saved):
    return *_backward_with(_lif_bwd, ctx, grad_s, grad_v), *([None] * 10)


_lif_fwd.register_autograd(_backward, setup_context=_setup_context)


def _call_backend_fwd(
    x, v_init, tau_t, tau, v_th, v_reset, soft, decay_input, _detach, _sid, _alpha, store_v_seq, backend
):
    return _backend_module(backend).lif_fwd(
        x, v_init, tau_t, tau, v_th, v_reset, soft, decay_input, store_v_seq
    )


def _call_backend_bwd(*args):
    *args, backend = args
    return _backend_module(backend).lif_bwd(*args)


class _EagerLIF(torch.autograd.Function):
    """The same forward and backward as the custom ops, without their dispatch: in eager mode the custom
    op's Python wrapping cost ~160 us per forward+backward (measured at 4 x 1024 neurons: 240 vs 81 us),
    which a model with dozens of LIF layers pays on every step. torch.compile and functorch transforms
    still go through the registered ops (their fake implementations and autograd registration)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _call_backend_fwd(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2], output[3])
        return output

    @staticmethod
    def backward(ctx, grad_s, grad_v, _grad_v_seq, _grad_saved):
        return *_backward_with(_call_backend_bwd, ctx, grad_s, grad_v), *([None] * 10)


def _fused_lif(*inputs):
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return _lif_fwd(*inputs)
    return _EagerLIF.apply(*inputs)


def _triton_usable(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _choose_backend(x: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if x.dtype not in _FUSED_DTYPES:
            return "torch"  # float64: the reference loop is the float64 path
        if x.is_cuda:
            return "triton" if importlib.util.find_spec("triton") is not None else "torch"
        return "cpu" if x.device.type == "cpu" else "torch"
    if backend in ("triton", "cpu") and x.dtype not in _FUSED_DTYPES:
        raise TypeError(
            f"backend={backend!r} takes float32, float16 or bfloat16 input, got {x.dtype}; "
            "use backend='torch' for float64"
        )
    if backend == "cpu" and x.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs a CPU tensor, got one on {x.device}; use backend='auto'")
    if backend == "triton" and not _triton_usable(x):
        raise ValueError(
            "backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 set before import to run the "
            "kernels on the CPU for testing); use backend='auto' or 'cpu' for CPU tensors"
        )
    return backend


def _tracing() -> bool:
    """Under torch.compile or a functorch transform (vmap, grad) tensors carry no values to check."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def _check_tau_values(tau: torch.Tensor) -> None:
    """A tensor tau obeys the float rule, ``tau > 0`` (inf allowed, NaN not), at every element. One
    reduction on tau's own device: a device-to-host sync when tau is a CUDA tensor."""
    with torch.no_grad():
        bad = ~(tau.detach() > 0)  # NaN compares False, so it is caught too
        n_bad = int(bad.sum())
        if n_bad:
            shown = ", ".join(str(v) for v in tau.detach()[bad][:5].tolist())
            raise ValueError(
                f"tau must be positive (> 0, inf allowed; NaN is not), but the tensor tau of shape "
                f"{tuple(tau.shape)} has {n_bad} of {tau.numel()} values that are not: "
                f"{shown}{', ...' if n_bad > 5 else ''}"
            )


def _check_tau(tau: float | torch.Tensor, neuron_shape: torch.Size, check_values: bool) -> None:
    """One tau rule for every backend (``torch``, ``cpu``, ``triton``): a float or every element of a tensor
    must be > 0 (NaN refused, inf allowed), and a tensor must broadcast to ``x.shape[1:]``."""
    if isinstance(tau, torch.Tensor):
        if not tau.is_floating_point():
            raise TypeError(f"a tensor tau must be floating point, got {tau.dtype}")
        check_tau_shape(tau, neuron_shape)
        if check_values and not _tracing() and tau.device.type != "meta":
            _check_tau_values(tau)
    elif not float(tau) > 0:
        raise ValueError(f"tau must be positive (> 0, inf allowed; NaN is not), got {tau}")


def lif_multi_step(
    x: torch.Tensor,
    v_init: torch.Tensor | None = None,
    *,
    neuron: NeuronConfig | None = None,
    tau: float | torch.Tensor = UNSET,
    v_threshold: float = UNSET,
    v_reset: float | None = UNSET,
    decay_input: bool = UNSET,
    detach_reset: bool = UNSET,
    surrogate: str = UNSET,
    alpha: float | None = UNSET,
    backend: str = UNSET,
    store_v_seq: bool = False,
):
    """Multi-step LIF over ``x[T, ...]`` (reference.py's equations, in docs/spikecore-equations.md).

    The neuron is ``neuron``, a :class:`spikecore.NeuronConfig` (tau, v_threshold, v_reset, decay_input,
    detach_reset, surrogate, alpha, backend), or the same settings as keyword arguments (the older
    spelling, still accepted; unset ones take NeuronConfig's defaults: tau 2, V_th 1, hard reset to 0,
    decay_input, no detached reset, sigmoid surrogate, backend auto). Both at once is a ``TypeError``.
    A per-neuron tensor ``tau`` (below) is given as the ``tau`` keyword.

    Returns ``(spikes, v_final)``, or ``(spikes, v_final, v_seq)`` with ``store_v_seq=True``.
    ``spikes`` has x's shape and dtype; ``v_final`` (shape ``x.shape[1:]``) and ``v_seq`` are float32
    (float64 for float64 input). ``v_reset=None`` is a soft reset. ``v_seq`` is for analysis and carries no
    gradient. ``backend``: ``"auto"`` (Triton on CUDA, the fused C++ kernels on CPU, numba where they cannot
    be built, the reference loop for float64), ``"triton"``, ``"cpu"`` or ``"torch"`` (the reference loop).

    ``tau`` must be > 0 (inf allowed: no leak with ``decay_input=False``; NaN refused), as a float or, for a
    floating-point tensor (PLIF), at every element; the tensor then receives a gradient. A tensor tau must
    broadcast to the neuron shape ``x.shape[1:]`` without adding dimensions (0-d, one per neuron, one per
    channel ``[C, 1, 1]``, ...), on every backend; a per-time-step ``[T, ...]`` tau is refused. Checking a
    tensor tau's values costs one reduction (a host sync for a CUDA tau) per call, and is skipped under
    ``torch.compile`` and functorch transforms, where tensors have no values yet. ``spikecore.LIF`` with
    ``learnable_tau`` skips it: its ``tau = 1 / sigmoid(w)`` is >= 1 for every non-NaN ``w`` by construction.
    """
    options = neuron_options(neuron, neuron_keywords(locals()), "lif_multi_step()")
    return _lif_multi_step(x, v_init, **options, store_v_seq=store_v_seq, check_tau_values=True)


def _lif_multi_step(
    x,
    v_init,
    *,
    tau,
    v_threshold,
    v_reset,
    decay_input,
    detach_reset,
    surrogate,
    alpha,
    backend,
    store_v_seq,
    check_tau_values,
):
    """``lif_multi_step``; ``check_tau_values=False`` is for callers whose tensor tau is valid by
    construction (``LIF``'s learnable ``1 / sigmoid(w)``): its shape and dtype are still checked."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float32, float16 or bfloat16), got {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have shape [T, ...] with T >= 1, got {tuple(x.shape)}")
    surr, alpha = resolve(surrogate, alpha)
    neuron_shape = x.shape[1:]
    _check_tau(tau, neuron_shape, check_tau_values)
    if isinstance(tau, torch.Tensor):
        tau = tau.to(x.device)  # differentiable: the gradient reaches tau where it lives
    backend = _choose_backend(x, backend)
    if v_init is not None:
        if not isinstance(v_init, torch.Tensor) or not v_init.is_floating_point():
            raise TypeError("v_init must be a floating-point tensor shaped like x.shape[1:]")
        if v_init.shape != neuron_shape:
            raise ValueError(
                f"v_init has shape {tuple(v_init.shape)} but x.shape[1:] is {tuple(neuron_shape)}; "
                "pass the v_final of a run over the same neurons, or None for zeros"
            )
        if v_init.device != x.device:
            raise ValueError(f"v_init is on {v_init.device} but x is on {x.device}")

    if backend == "torch":
        return lif_reference(
            x,
            v_init,
            tau=tau,
            v_threshold=v_threshold,
            v_reset=v_reset,
            decay_input=decay_input,
            detach_reset=detach_reset,
            surrogate=surr.name,
            alpha=alpha,
            store_v_seq=store_v_seq,
        )

    T = x.shape[0]
    n = neuron_shape.numel()
    x2 = (x if x.dim() == 2 else x.reshape(T, n)).contiguous()  # a reshape would add a node to the graph
    v0 = None if v_init is None else v_init.reshape(n).float().contiguous()
    tau_t = None
    tau_f = 2.0
    if isinstance(tau, torch.Tensor):
        tau_t = tau.expand(neuron_shape).reshape(n).float().contiguous()  # shape checked above
    else:
        tau_f = float(tau)
    soft = v_reset is None
    spikes, v_final, v_seq, _saved = _fused_lif(
        x2,
        v0,
        tau_t,
        tau_f,
        float(v_threshold),
        0.0 if soft else float(v_reset),
        soft,
        bool(decay_input),
        bool(detach_reset),
        surr.id,
        alpha,
        bool(store_v_seq),
        backend,
    )
    # A view of an autograd output costs ~7 us; a [T, N] input needs none.
    if spikes.shape != x.shape:
        spikes = spikes.view(x.shape)
    if v_final.shape != neuron_shape:
        v_final = v_final.view(neuron_shape)
    if store_v_seq:
        return spikes, v_final, v_seq.detach().view(x.shape)
    return spikes, v_final
