"""``LIF``: the multi-step LIF as an ``nn.Module`` over ``[T, ...]`` input."""

import math

import torch
from torch import nn

from .config import UNSET, NeuronConfig, neuron_keywords, neuron_options
from .ops import BACKENDS, _lif_multi_step, lif_multi_step


class LIF(nn.Module):
    """Multi-step LIF neuron layer (a thin module over :func:`spikecore.lif_multi_step`).

    Stateless by default: every call starts from ``v = 0`` (or the ``v_init`` it is given), so no state can
    leak from one batch into the next. With ``stateful=True`` the module carries ``v`` from call to call
    (e.g. to run T steps as segments) until :meth:`reset` is called; a call whose neuron shape differs
    from the carried state raises instead of silently broadcasting, which catches a forgotten reset at
    the first new batch size.

    ``tau`` is one float > 0 (a 1-element tensor is taken as its float; for a per-neuron tau call
    :func:`spikecore.lif_multi_step` with a tensor). ``learnable_tau=True`` gives a PLIF neuron:
    ``tau = 1 / sigmoid(w)`` with one learnable ``w`` initialised so that ``tau`` starts at the given value,
    which must then be finite and > 1. The tau rule is checked here, once: ``1 / sigmoid(w)`` is >= 1 for
    any non-NaN ``w``, so ``forward`` does not re-check the learnable tau's value (on CUDA that would cost a
    host sync every step); a NaN ``w`` from diverged training is left to the loss to show.

    The neuron's settings are ``neuron``, a :class:`spikecore.NeuronConfig`, or the same settings as
    keyword arguments (the older spelling; unset ones take NeuronConfig's defaults); both at once is a
    ``TypeError``. :attr:`neuron` gives them back as one value.
    """

    def __init__(
        self,
        tau: float = UNSET,
        v_threshold: float = UNSET,
        v_reset: float | None = UNSET,
        decay_input: bool = UNSET,
        detach_reset: bool = UNSET,
        surrogate: str = UNSET,
        alpha: float | None = UNSET,
        backend: str = UNSET,
        learnable_tau: bool = False,
        stateful: bool = False,
        store_v_seq: bool = False,
        *,
        neuron: NeuronConfig | None = None,
    ):
        super().__init__()
        options = neuron_options(neuron, neuron_keywords(locals()), "LIF()")
        tau, v_threshold, v_reset = options["tau"], options["v_threshold"], options["v_reset"]
        decay_input, detach_reset = options["decay_input"], options["detach_reset"]
        surrogate, alpha, backend = options["surrogate"], options["alpha"], options["backend"]
        if isinstance(tau, torch.Tensor):
            if tau.numel() != 1:
                raise TypeError(
                    f"LIF takes one float tau, got a tensor of shape {tuple(tau.shape)}; for a per-neuron "
                    "tau call spikecore.lif_multi_step(x, tau=tensor)"
                )
            tau = tau.item()
        if learnable_tau and not (tau > 1 and math.isfinite(tau)):
            raise ValueError(f"learnable_tau needs a finite initial tau > 1, got {tau}")
        self.v_threshold = v_threshold
        self.v_reset = v_reset
        self.decay_input = decay_input
        self.detach_reset = detach_reset
        self.surrogate = surrogate
        self.alpha = alpha
        self.backend = backend
        self.stateful = stateful
        self.store_v_seq = store_v_seq
        if learnable_tau:
            self.w = nn.Parameter(torch.tensor(-math.log(tau - 1.0)))
            self._tau = None
        else:
            self.w = None
            self._tau = float(tau)
        self.v: torch.Tensor | None = None
        self.v_seq: torch.Tensor | None = None
        # Validate the configuration once, up front, rather than at the first forward.
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        lif_multi_step(
            torch.zeros(1, 1),
            tau=float(tau),
            v_threshold=v_threshold,
            v_reset=v_reset,
            surrogate=surrogate,
            alpha=alpha,
            backend="torch",
        )

    @property
    def tau(self) -> float | torch.Tensor:
        return self._tau if self.w is None else 1.0 / torch.sigmoid(self.w)

    @property
    def neuron(self) -> NeuronConfig:
        """This neuron's settings as one value (a learnable tau at its current value)."""
        tau = self._tau if self.w is None else float(self.tau.detach())
        return NeuronConfig(
            tau=tau,
            v_threshold=self.v_threshold,
            v_reset=self.v_reset,
            decay_input=self.decay_input,
            detach_reset=self.detach_reset,
            surrogate=self.surrogate,
            alpha=self.alpha,
            backend=self.backend,
        )

    def options(self) -> dict:
        """This neuron's parameters as keyword arguments (tau, threshold, reset, surrogate, backend), for
        code that runs the same neuron through another op (e.g. a fused attention kernel)."""
        return dict(
            tau=self.tau,
            v_threshold=self.v_threshold,
            v_reset=self.v_reset,
            detach_reset=self.detach_reset,
            surrogate=self.surrogate,
            alpha=self.alpha,
            backend=self.backend,
        )

    def reset(self) -> None:
        """Forget the carried membrane potential (and the stored V sequence)."""
        self.v = None
        self.v_seq = None

    def forward(self, x: torch.Tensor, v_init: torch.Tensor | None = None) -> torch.Tensor:
        if v_init is None and self.stateful and self.v is not None:
            if self.v.shape != x.shape[1:]:
                raise RuntimeError(
                    f"LIF carries state of shape {tuple(self.v.shape)} but got input with neuron shape "
                    f"{tuple(x.shape[1:])}: call reset() (or spikecore.reset(model)) between batches"
                )
            v_init = self.v
        # The tau was validated in __init__ (see the class docstring), so its value is not re-checked here.
        out = _lif_multi_step(
            x,
            v_init,
            **self.options(),
            decay_input=self.decay_input,
            store_v_seq=self.store_v_seq,
            check_tau_values=False,
        )
        spikes, v_final = out[0], out[1]
        if self.store_v_seq:
            self.v_seq = out[2]
        if self.stateful:
            self.v = v_final
        return spikes

    def extra_repr(self) -> str:
        tau = "learnable" if self.w is not None else self._tau
        return (
            f"tau={tau}, v_threshold={self.v_threshold}, v_reset={self.v_reset}, "
            f"detach_reset={self.detach_reset}, surrogate={self.surrogate}, backend={self.backend}, "
            f"stateful={self.stateful}"
        )


def reset(model: nn.Module) -> None:
    """Reset every stateful spikecore neuron in ``model``."""
    for m in model.modules():
        if isinstance(m, LIF):
            m.reset()
