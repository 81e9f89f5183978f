"""Gradients along time as the paper's Theorem 4.3 states them, and the PM's surrogate gradients (Fig. 3).

Every spikecore LIF computes, per neuron j and step t (input X, decay_input; ``V_reset = 0`` when hard):

    H(t) = V(t-1) + (X(t) - (V(t-1) - V_reset)) / tau
    S(t) = Theta(H(t) - V_th)                      backward: the surrogate sigma'(H(t) - V_th)
    V(t) = H(t) - V_th S(t)                        soft reset (``v_reset=None``)
    V(t) = H(t) (1 - S(t)) + V_reset S(t)          hard reset (S detached with ``detach_reset``)

**Theorem 4.3's quantity.** The sensitivity of a layer's membrane to its own previous value,

    eps_jj(t) = dH_j(t+1) / dH_j(t)       (total derivative through the whole network)
              = (1 - 1/tau) (1 - V_th sigma'(H_j(t) - V_th))        the neuron's own path (soft reset)
              + (1/tau) [dX(t+1) / dS(t)]_jj sigma'(H_j(t) - V_th)   paths back into the layer (feedback)

Under the theorem's assumptions (rectangular surrogate ``sigma'(x) = 1/V_th`` for ``|x| < V_th / 2``, i.e.
spikecore's ``rect`` with ``alpha = V_th``; soft reset; reset not detached) the own path is exactly 0 for
``V_th / 2 < H_j(t) < 3 V_th / 2`` and ``1 - 1/tau`` elsewhere; without feedback that is all of eps. The
top-down term adds the second line. TDFormer's feedback reaches a layer ``T'`` steps later (segment n's
step t' modulates segment n+1's step t'), so besides eps(t) (the superdiagonal) the measure is the whole
upper triangle ``E[t1, t2] = dH_j(t2) / dH_j(t1)``, t1 < t2: without feedback it is the product
eps_jj(t1) ... eps_jj(t2 - 1) along the neuron's own chain, which vanishes once any step of it sits in the
window; with feedback a path of lag ``T'`` can carry it.

How it is measured (:func:`diagonal_sensitivity`, :class:`SensitivityStats`): inside
:class:`NeuronRecorder` every LIF runs the plain PyTorch loop of spikecore's reference
(``spikecore.lif_reference``) and records ``H(t) - V_th`` at every step (across TDFormer's segments); with
``probe=True`` a zero tensor ``delta(t)`` is added to ``H(t)`` (as ``tau * delta`` on the input, which
enters H only), so ``dH(t2) / d delta(t1)`` is the total derivative above. For ``k`` sampled neurons j of
each layer (the same j in every sample; samples are independent in eval mode), a vector-Jacobian product
with the one-hot cotangent at ``H_j(t2)`` gives ``dH_j(t2)/dH(t1)`` for all t1 at once; its j-th entry is
``E_jj[t1, t2]``.

**Fig. 3** (:func:`pm_surrogate_gradients`): the values ``sigma'(H - V_th)`` of the PM's token-mixer LIF
(the neuron after ``X * clamp(M, b, a)``) over every neuron, step and sample, with the clamp as trained and
with it removed (``M`` unbounded), same weights and inputs, as histograms over ``[0, sigma'(0)]``; with
the mean and variance of M as used and the fraction of M (before the clamp) outside the clamp's bounds.
"""

import math
from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from spikecore import LIF, heaviside, lif_reference
from spikecore.neuron.surrogate import derivative, resolve

NEURON_SETTINGS = ("theorem", "trained")
VANISHED = 1e-6  # |eps| at or below this counts as vanished (the theorem's zeros are exact zeros)


class NeuronRecorder:
    """Context manager: every spikecore :class:`~spikecore.LIF` of ``model`` (or those named in ``names``)
    runs the plain PyTorch LIF loop and records ``H(t) - V_th`` step by step.

    ``neurons="theorem"`` switches the neurons to Theorem 4.3's assumptions while inside: soft reset
    (``v_reset=None``), reset not detached, rectangular surrogate with ``alpha = V_th`` (window
    ``|H - V_th| < V_th / 2``); tau and the thresholds stay. ``"trained"`` keeps them as they are.
    ``probe=True`` adds a zero leaf ``delta`` (requires grad) to every ``H(t)``; see the module docstring.

    After the run: ``z[name]`` lists ``H(t) - V_th`` per step (``[B, *neuron]``, in call order, so a
    stateful layer run segment after segment gives all T steps), ``probes[name]`` the ``(delta, index)`` of
    each step, ``thresholds[name]`` and ``taus[name]``.
    """

    def __init__(
        self,
        model: nn.Module,
        neurons: str = "trained",
        probe: bool = False,
        names: Iterable[str] | None = None,
    ):
        if neurons not in NEURON_SETTINGS:
            raise ValueError(f"neurons must be one of {', '.join(NEURON_SETTINGS)}, got {neurons!r}")
        lifs = {n: m for n, m in model.named_modules() if isinstance(m, LIF)}
        if names is not None:
            names = list(names)
            missing = sorted(set(names) - set(lifs))
            if missing:
                raise ValueError(f"no spikecore LIF named {missing} in the model")
            lifs = {n: lifs[n] for n in names}
        self.lifs = lifs
        self.neurons = neurons
        self.probe = probe
        self.z: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.probes: dict[str, list[tuple[torch.Tensor, int]]] = defaultdict(list)
        self.thresholds: dict[str, float] = {}
        self.taus: dict[str, float] = {}
        self._saved: dict[str, dict] = {}

    def __enter__(self) -> "NeuronRecorder":
        for name, m in self.lifs.items():
            keys = ("v_reset", "detach_reset", "surrogate", "alpha", "store_v_seq")
            self._saved[name] = {k: getattr(m, k) for k in keys}
            if self.neurons == "theorem":
                m.v_reset, m.detach_reset, m.surrogate, m.alpha = None, False, "rect", float(m.v_threshold)
            # A fused attention core (SDSA on CUDA) reads a plain stateless LIF's options instead of calling
            # it; a LIF that stores its V sequence is always called, so every neuron passes through here.
            m.store_v_seq = True
            m.forward = self._forward(name, m)
        return self

    def __exit__(self, *exc) -> None:
        for name, m in self.lifs.items():
            del m.forward
            for k, v in self._saved[name].items():
                setattr(m, k, v)
            m.v_seq = None

    def _forward(self, name: str, m: LIF) -> Callable:
        def forward(x: torch.Tensor, v_init: torch.Tensor | None = None) -> torch.Tensor:
            if v_init is None and m.stateful and m.v is not None:
                if m.v.shape != x.shape[1:]:
                    raise RuntimeError(
                        f"LIF {name} carries state of shape {tuple(m.v.shape)} but got input with neuron "
                        f"shape {tuple(x.shape[1:])}: reset the model between batches"
                    )
                v_init = m.v
            opts = m.options()
            opts.pop("backend")
            tau = opts["tau"]
            xin = x
            if self.probe:
                dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
                delta = torch.zeros(x.shape, dtype=dtype, device=x.device, requires_grad=True)
                gain = (tau.detach() if isinstance(tau, torch.Tensor) else tau) if m.decay_input else 1.0
                xin = x.to(dtype) + gain * delta  # X enters H(t) only, as X / tau: H(t) += delta
            zs: list[torch.Tensor] = []

            def spike_fn(z: torch.Tensor) -> torch.Tensor:
                zs.append(z)
                return heaviside(z, opts["surrogate"], opts["alpha"])

            spikes, v = lif_reference(xin, v_init, **opts, decay_input=m.decay_input, spike_fn=spike_fn)
            if m.stateful:
                m.v = v
            self.z[name].extend(zs)
            if self.probe:
                self.probes[name].extend((delta, i) for i in range(len(zs)))
            self.thresholds[name] = float(m.v_threshold)
            self.taus[name] = float(tau)
            return spikes.to(x.dtype)

        return forward


def diagonal_sensitivity(
    z: list[torch.Tensor], probes: list[tuple[torch.Tensor, int]], index: torch.Tensor
) -> torch.Tensor:
    """``E[t1, t2, b, i] = dH_j(t2) / dH_j(t1)`` of sample b for the neurons ``j = index[i]`` (flat indices
    into one sample's neurons), t1 < t2; NaN elsewhere. ``z`` and ``probes`` come from a
    :class:`NeuronRecorder` run with ``probe=True`` whose graph is still alive."""
    T, B, k = len(z), z[0].shape[0], len(index)
    out = torch.full((T, T, B, k), math.nan, dtype=torch.float64)
    leaves: list[torch.Tensor] = []
    where: list[tuple[int, int]] = []  # step -> (leaf position, index within that call)
    for delta, i in probes:
        if not leaves or leaves[-1] is not delta:
            leaves.append(delta)
        where.append((len(leaves) - 1, i))
    picks = torch.arange(k)
    for t2 in range(1, T):
        y = z[t2].flatten(1)[:, index.to(z[t2].device)]  # [B, k]
        needed = sorted({where[t1][0] for t1 in range(t2)})
        cot = torch.zeros(k, B, k, dtype=y.dtype, device=y.device)
        cot[picks, :, picks] = 1.0  # cotangent i: one-hot at neuron index[i] in every sample
        inputs = [leaves[p] for p in needed]
        try:
            grads = torch.autograd.grad(
                y, inputs, cot, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        except RuntimeError:  # an op without a batching rule: one product per neuron
            per = [torch.autograd.grad(y, inputs, c, retain_graph=True, allow_unused=True) for c in cot]
            grads = tuple(
                None if per[0][p] is None else torch.stack([g[p] for g in per]) for p in range(len(inputs))
            )
        by_leaf = dict(zip(needed, grads, strict=True))
        for t1 in range(t2):
            leaf, i = where[t1]
            g = by_leaf[leaf]
            if g is None:
                out[t1, t2] = 0.0
                continue
            g = g[:, i].flatten(2)  # [k, B, n]: d H_index[i](t2) / d H(t1)
            out[t1, t2] = g[picks, :, index.to(g.device)].T.double().cpu()
    return out


def sample_neurons(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``min(k, n)`` distinct flat neuron indices out of ``n``, drawn with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: min(k, n)].sort().values


class SensitivityStats:
    """Accumulates :func:`diagonal_sensitivity` over batches, per layer; :meth:`summary` gives the JSON."""

    def __init__(self, neurons_per_layer: int, seed: int = 0):
        self.k = neurons_per_layer
        self.seed = seed
        self.values: dict[str, list[torch.Tensor]] = defaultdict(list)  # [T, T, B, k] per batch
        self.window: dict[str, list[torch.Tensor]] = defaultdict(list)  # [T, B, k] in the theorem's window
        self.skipped: dict[str, str] = {}

    def add(self, rec: NeuronRecorder, steps: int) -> None:
        for name, z in rec.z.items():
            if len(z) != steps:
                self.skipped[name] = f"runs {len(z)} steps, not the T={steps} of the time axis"
                continue
            index = sample_neurons(z[0][0].numel(), self.k, self.seed)
            self.values[name].append(diagonal_sensitivity(z, rec.probes[name], index))
            half = rec.thresholds[name] / 2
            zz = torch.stack([s.detach().flatten(1)[:, index.to(s.device)] for s in z]).double().cpu()
            self.window[name].append(zz.abs() < half)

    def summary(self) -> dict:
        layers = {}
        for name, vals in self.values.items():
            v = torch.cat(vals, dim=2)  # [T, T, S, k]
            w = torch.cat(self.window[name], dim=1).double()
            layers[name] = {
                "mean": _matrix(v.mean(dim=(2, 3))),
                "mean_abs": _matrix(v.abs().mean(dim=(2, 3))),
                "vanished_fraction": _matrix((v.abs() <= VANISHED).double().mean(dim=(2, 3))),
                "in_window_fraction": w.mean(dim=(1, 2)).tolist(),
            }
        T = len(next(iter(layers.values()))["mean"]) if layers else 0

        def over_layers(key: str) -> list[list[float | None]]:
            return [
                [
                    None if t2 <= t1 else float(np.mean([lay[key][t1][t2] for lay in layers.values()]))
                    for t2 in range(T)
                ]
                for t1 in range(T)
            ]

        matrix = {key: over_layers(key) for key in ("mean", "mean_abs", "vanished_fraction")}
        one_step = {key: [matrix[key][t][t + 1] for t in range(T - 1)] for key in matrix}
        one_step["in_window_fraction"] = [
            float(np.mean([lay["in_window_fraction"][t] for lay in layers.values()])) for t in range(T - 1)
        ]
        samples = int(torch.cat(self.values[next(iter(self.values))], dim=2).shape[2]) if layers else 0
        return {
            "neurons_per_layer": self.k,
            "samples": samples,
            "one_step": one_step,
            "matrix": matrix,
            "layers": layers,
            "skipped_layers": self.skipped,
        }


def _matrix(m: torch.Tensor) -> list[list[float | None]]:
    """``[T, T]`` -> nested lists with ``None`` on and below the diagonal (t2 <= t1)."""
    T = m.shape[0]
    return [[None if t2 <= t1 else float(m[t1, t2]) for t2 in range(T)] for t1 in range(T)]


def surrogate_peak(surrogate: str, alpha: float | None) -> tuple[float, float]:
    """(alpha, sigma'(0)): every spikecore surrogate peaks at 0, so its values lie in ``[0, sigma'(0)]``."""
    s, a = resolve(surrogate, alpha)
    return a, float(derivative(s.name, torch.zeros((), dtype=torch.float64), a))


def histogram(values: torch.Tensor, edges: np.ndarray) -> list[int]:
    """Counts of ``values`` in the bins ``[e_i, e_i+1)`` (the last bin closed), as ``numpy.histogram``."""
    counts, _ = np.histogram(values.detach().double().cpu().numpy().ravel(), bins=edges)
    return counts.tolist()


@torch.no_grad()
def pm_surrogate_gradients(net: nn.Module, batches: list, device: torch.device, bins: int = 40) -> dict:
    """Fig. 3: histograms of ``sigma'(H - V_th)`` of the PM token-mixer LIF, clamp on vs off (see the module
    docstring). ``net`` is a TDFormer with feedback on; ``batches`` are ``(x, y)`` pairs."""
    pm, lif = net.pm, net.pm.token_lif
    alpha, peak = surrogate_peak(lif.surrogate, lif.alpha)
    edges = np.linspace(0.0, peak, bins + 1)
    trained = (pm.clamp_min, pm.clamp_max)
    maps: list[torch.Tensor] = []

    def keep_map(mod: nn.Module, args: tuple) -> None:  # M before the clamp
        maps.append(torch.einsum("tbcn,c->tbn", args[0], mod.token_weight.to(args[0].dtype)))

    handle = pm.register_forward_pre_hook(keep_map)
    out = {
        "layer": "pm.token_lif",
        "surrogate": lif.surrogate,
        "alpha": alpha,
        "v_threshold": float(lif.v_threshold),
        "clamp": list(trained),
        "bin_edges": edges.tolist(),
    }
    try:
        for label, bounds in (("clamped", trained), ("unclamped", (-math.inf, math.inf))):
            pm.clamp_min, pm.clamp_max = bounds
            maps.clear()
            values = []
            for x, _ in batches:
                with NeuronRecorder(pm, names=["token_lif"]) as rec:
                    net.forward_segments(_time_major(x.to(device)))
                values.append(torch.stack(rec.z["token_lif"]).flatten())
            sg = derivative(lif.surrogate, torch.cat(values).double(), alpha)
            raw = torch.cat([t.flatten() for t in maps]).double()
            m = raw.clamp(*bounds)
            out[label] = {
                "counts": histogram(sg, edges),
                "values": int(sg.numel()),
                "mean": float(sg.mean()),
                "below_1pct_of_peak": float((sg < 0.01 * peak).double().mean()),
                "map_mean": float(m.mean()),
                "map_var": float(m.var()),
                "map_outside_clamp": float(((raw < trained[0]) | (raw > trained[1])).double().mean()),
            }
    finally:
        pm.clamp_min, pm.clamp_max = trained
        handle.remove()
    return out


def _time_major(x: torch.Tensor) -> torch.Tensor:
    """Event frames ``[B, T, C, H, W]`` from a data module -> ``[T, B, C, H, W]``; images pass through."""
    return x.transpose(0, 1).contiguous() if x.dim() == 5 else x
