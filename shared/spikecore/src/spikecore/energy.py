"""Operation counts and the theoretical energy of a spiking network, from the operations that actually ran.

The convention of the spiking-transformer papers (Spikformer, SDT, QKFormer, TDFormer, SpiLiFormer):
an operation whose input is real-valued (the first conv on the image, a head on averaged features) costs
multiply-accumulates; one whose input is spikes costs only accumulates, as many as its dense MACs
weighted by the input's firing rate (``SOP = fr x T x FLOPs`` in those papers, T being already in the
count here since every step runs). For every weight op that ran (conv, linear, matmul, attention):

    dense MACs   D = the op's multiply-accumulates at full density
                     (torch.utils.flop_counter's formula for the op, which counts 2 FLOPs per MAC, / 2)
    spike operand: a multiplicand whose values are all in {0, 1} (with ``integer_counts``, all
                   non-negative integers: spike counts such as the SEW residual sums x + attn(x));
                   never a parameter of the model. Its rate r = sum of its values / its size.
    no spike operand (real-valued input):   MACs = D
    one spike operand (a layer on spikes):  ACs = round(D * r)
    two spike operands (Q K^T, (Q K^T) V, K^T V between spike tensors):  ACs = round(D * min(r_1, r_2))
                   (an event-driven product walks the sparser operand's spikes and accumulates the
                   other's entries; which operand is "first" then does not depend on how the code orders
                   the product)
    E [mJ]       = (E_MAC * MACs + E_AC * ACs) [pJ] * 1e-9      45 nm: E_MAC = 4.6 pJ, E_AC = 0.9 pJ
    FLOPs        = 2 * sum of D                (torch's convention: a multiply-add is 2 FLOPs)

Element-wise work (BatchNorm, which folds into the preceding conv at inference, the LIF update, residual
sums, pooling, the masks and sums of SDSA / QKTA / FF-LiDiff) is not counted, as in the papers. Papers'
"FLOPs" usually mean dense MACs (TDFormer's appendix C.1: "FLOPs ... is the number of multiply-and-
accumulate operations"): compare their "GFLOPs" with ``dense_macs``, not with ``flops``.

Why torch's counter and not spikingjelly's ``op_counter``: torch's ``flop_registry`` holds the formula of
every matmul / conv / attention aten op and needs nothing beyond torch, while spikingjelly is a
test-only peer of this project (never a run-time dependency). Its counters also follow another
convention: ``SynOpCounter`` counts the exact synaptic events (a padded conv's border spikes drive fewer
weights, a spike x spike product counts only coinciding ones), and ``MACCounter``'s spike test takes
integer spike counts for real values. The tests use it as the independent reference where the
conventions meet (linear layers and 1x1 convs on binary spikes, the first layer's MACs).

How: a ``TorchDispatchMode`` sees every aten op with its real input tensors; ops with a forward formula
in ``torch.utils.flop_counter.flop_registry`` are counted (backward ops are not), each tensor is tested
for spikes, and forward hooks on the model's modules attribute each op to the innermost module running.
"""

import argparse
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .errors import ConfigError

__all__ = [
    "E_AC_45NM_PJ",
    "E_MAC_45NM_PJ",
    "EnergyCounter",
    "EnergyReport",
    "LayerEnergy",
    "estimate",
    "estimate_batches",
    "write_comparison",
]

E_MAC_45NM_PJ = 4.6  # energy of a 32-bit float multiply-accumulate at 45 nm (Horowitz, ISSCC 2014)
E_AC_45NM_PJ = 0.9  # energy of a 32-bit float add (accumulate) at 45 nm

aten = torch.ops.aten

# The forward ops torch knows a formula for (matmuls, convolutions, attention kernels).
_FORWARD_OPS = {op: f for op, f in flop_registry.items() if "backward" not in str(op)}
# Which arguments are the two (three) multiplicands; the others are biases or options. Ops of the
# registry not listed here take every tensor argument.
_OPERANDS = {
    aten.mm: (0, 1),
    aten.bmm: (0, 1),
    aten.addmm: (1, 2),
    aten.baddbmm: (1, 2),
    aten._scaled_mm: (0, 1),
    aten.convolution: (0, 1),
    aten._convolution: (0, 1),
    aten.cudnn_convolution: (0, 1),
    aten.convolution_overrideable: (0, 1),
    aten._slow_conv2d_forward: (0, 1),
}
_CONVS = {
    aten.convolution,
    aten._convolution,
    aten.cudnn_convolution,
    aten.convolution_overrideable,
    aten._slow_conv2d_forward,
}
_MATMULS = {aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten._scaled_mm}

CONVENTION = (
    "MACs: ops with no spike operand, at full density; ACs: ops with a spike operand, dense MACs x the "
    "operand's firing rate (the smaller rate for spike x spike); energy = E_MAC*MACs + E_AC*ACs; "
    "dense_macs = every counted op at full density (what the papers call FLOPs); flops = 2 * dense_macs"
)


def _check_energy(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of picojoules, got {value!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number of picojoules >= 0, got {value}")
    return value


@dataclass(frozen=True)
class LayerEnergy:
    """One row of the table: the ops of one module (``layer``) of one ``kind`` on one ``input`` class.

    ``input`` is ``"real"`` (MACs) or ``"spikes"`` (ACs); ``input_rate`` is the firing rate the ACs were
    weighted with (ACs / dense MACs, i.e. the mean over calls; ``None`` for real input). ``calls`` counts
    the ops (a module called at several segments or passes adds up).
    """

    layer: str
    kind: str
    input: str
    input_rate: float | None
    calls: int
    dense_macs: int
    macs: int
    acs: int
    energy_mj: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class EnergyReport:
    """Totals over everything that ran while counting (every sample, every time step), and per layer.

    ``energy_mj = (e_mac_pj * macs + e_ac_pj * acs) * 1e-9``; ``flops = 2 * dense_macs``; ``params`` is
    the model's parameter count. ``samples`` is how many samples the inputs held (given by the caller):
    :meth:`to_dict` adds per-sample figures, which the papers quote.
    """

    macs: int
    acs: int
    dense_macs: int
    params: int
    e_mac_pj: float
    e_ac_pj: float
    samples: int
    layers: list[LayerEnergy] = field(default_factory=list)

    @property
    def energy_mj(self) -> float:
        return (self.e_mac_pj * self.macs + self.e_ac_pj * self.acs) * 1e-9

    @property
    def flops(self) -> int:
        return 2 * self.dense_macs

    def with_constants(self, e_mac_pj: float | None = None, e_ac_pj: float | None = None) -> "EnergyReport":
        """The same counts priced with other energies per operation (picojoules; ``None`` keeps one)."""
        e_mac = _check_energy("e_mac_pj", self.e_mac_pj if e_mac_pj is None else e_mac_pj)
        e_ac = _check_energy("e_ac_pj", self.e_ac_pj if e_ac_pj is None else e_ac_pj)
        layers = [replace(r, energy_mj=(e_mac * r.macs + e_ac * r.acs) * 1e-9) for r in self.layers]
        return replace(self, e_mac_pj=e_mac, e_ac_pj=e_ac, layers=layers)

    def to_dict(self) -> dict[str, Any]:
        per = {
            k: getattr(self, k) / self.samples for k in ("macs", "acs", "dense_macs", "flops", "energy_mj")
        }
        return {
            "convention": CONVENTION,
            "e_mac_pj": self.e_mac_pj,
            "e_ac_pj": self.e_ac_pj,
            "samples": self.samples,
            "params": self.params,
            "macs": self.macs,
            "acs": self.acs,
            "dense_macs": self.dense_macs,
            "flops": self.flops,
            "energy_mj": self.energy_mj,
            "per_sample": per,
            "layers": [r.to_dict() for r in self.layers],
        }

    def markdown(self, max_rows: int | None = None) -> str:
        """The per-layer table (per sample) as markdown, largest energy first (``max_rows`` of them)."""
        s = self.samples
        rows = sorted(self.layers, key=lambda r: -r.energy_mj)[:max_rows]
        lines = [
            "| layer | kind | input | firing rate | dense MMACs | MMACs | M ACs | energy (uJ) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            rate = "" if r.input_rate is None else f"{r.input_rate:.4g}"
            lines.append(
                f"| {r.layer} | {r.kind} | {r.input} | {rate} | {r.dense_macs / s / 1e6:.4g} | "
                f"{r.macs / s / 1e6:.4g} | {r.acs / s / 1e6:.4g} | {r.energy_mj / s * 1e3:.4g} |"
            )
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"| ({len(self.layers) - max_rows} smaller rows left out) | | | | | | | |")
        return "\n".join(lines)


class _Row:
    __slots__ = ("acs", "calls", "dense", "dense_spiking", "macs")

    def __init__(self):
        self.calls = self.dense = self.dense_spiking = self.macs = self.acs = 0


class _CountingMode(TorchDispatchMode):
    def __init__(self, counter: "EnergyCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = getattr(func, "_overloadpacket", None)
        if packet is None:  # a higher-order op (torch.compile regions): run as it is, not counted
            return func(*args, **kwargs)
        if packet not in _FORWARD_OPS:
            # As FlopCounterMode does: an op without a formula may decompose into ops with one.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if packet in _FORWARD_OPS:
            self.counter._count(packet, func, args, kwargs, out)
        return out


class EnergyCounter:
    """Counts the MACs and ACs of every call of ``model`` made inside ``with counter:`` (see the module
    docstring for the rules); :meth:`report` gives the totals and the per-layer table.

    ``integer_counts=True`` takes tensors of non-negative integers (spike counts, e.g. the SEW residual
    sums of Spikformer / QKFormer blocks) as spikes with that many events per element; ``False`` takes
    only {0, 1} tensors as spikes (the rule of spikingjelly's and syops-counter's tools), so layers on such
    sums count as MACs. The model runs as it is (mode, gradients, neuron state): :func:`estimate` is the
    one-call form that runs it in eval mode without gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        e_mac_pj: float = E_MAC_45NM_PJ,
        e_ac_pj: float = E_AC_45NM_PJ,
        integer_counts: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"energy counting needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.e_mac_pj = _check_energy("e_mac_pj", e_mac_pj)
        self.e_ac_pj = _check_energy("e_ac_pj", e_ac_pj)
        self.integer_counts = bool(integer_counts)
        self.rows: dict[tuple[str, str, str], _Row] = {}
        self._stack: list[str] = []
        self._handles: list = []
        self._mode: _CountingMode | None = None
        self._weights: set[int] = set()

    # -- context ---------------------------------------------------------------------------------------
    def __enter__(self) -> "EnergyCounter":
        root = type(self.model).__name__
        self._weights = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        self._weights.discard(0)
        self._stack = []
        for name, module in self.model.named_modules():
            label = name or root
            self._handles.append(module.register_forward_pre_hook(self._push(label)))
            self._handles.append(module.register_forward_hook(self._pop, always_call=True))
        self._mode = _CountingMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc)
        finally:
            self._mode = None
            for h in self._handles:
                h.remove()
            self._handles = []
            self._stack = []

    def _push(self, label: str):
        def hook(module, args):
            self._stack.append(label)

        return hook

    def _pop(self, module, args, output):
        if self._stack:
            self._stack.pop()

    # -- counting --------------------------------------------------------------------------------------
    def _spike_total(self, x: torch.Tensor) -> int | None:
        """Sum of ``x``'s values if ``x`` is spikes (see the class docstring), else ``None``."""
        if x.dtype == torch.bool:
            return int(x.sum())
        if x.is_complex():
            return None
        if x.numel() == 0:
            return 0
        if bool(((x == 0) | (x == 1)).all()):
            return int(x.sum(dtype=torch.float64))
        if not self.integer_counts:
            return None
        if x.is_floating_point():
            ok = bool(((x >= 0) & (x == torch.round(x))).all())  # NaN and inf fail the second test
        else:
            ok = bool((x >= 0).all())
        return int(x.sum(dtype=torch.float64)) if ok else None

    def _count(self, packet, func, args, kwargs, out) -> None:
        dense = int(_FORWARD_OPS[packet](*args, **kwargs, out_val=out)) // 2
        idx = _OPERANDS.get(packet)
        operands = [args[i] for i in idx] if idx else [a for a in args if isinstance(a, torch.Tensor)]
        operands = [a for a in operands if isinstance(a, torch.Tensor)]
        is_weight = [a.untyped_storage().data_ptr() in self._weights for a in operands]
        rates = []
        for a, weight in zip(operands, is_weight, strict=True):
            if weight:
                continue
            total = self._spike_total(a)
            if total is not None:
                rates.append(Fraction(total, max(a.numel(), 1)))
        if packet in _CONVS:
            kind = f"conv{operands[1].dim() - 2}d"
        elif packet in _MATMULS:
            kind = "linear" if any(is_weight) else "matmul"
        else:
            kind = "attention"
        label = self._stack[-1] if self._stack else type(self.model).__name__
        key = (label, kind, "spikes" if rates else "real")
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = _Row()
        row.calls += 1
        row.dense += dense
        if rates:
            acs = min(rates) * dense
            row.acs += math.floor(acs + Fraction(1, 2))
            row.dense_spiking += dense
        else:
            row.macs += dense

    def report(self, samples: int = 1) -> EnergyReport:
        """The totals and the per-layer table of everything counted so far (``samples`` in the inputs)."""
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(
                f"samples must be a positive integer (the samples in the inputs), got {samples!r}"
            )
        layers = []
        for (layer, kind, inp), r in self.rows.items():
            rate = r.acs / r.dense_spiking if r.dense_spiking else (0.0 if inp == "spikes" else None)
            energy = (self.e_mac_pj * r.macs + self.e_ac_pj * r.acs) * 1e-9
            layers.append(LayerEnergy(layer, kind, inp, rate, r.calls, r.dense, r.macs, r.acs, energy))
        params = sum(p.numel() for p in self.model.parameters())
        return EnergyReport(
            macs=sum(r.macs for r in layers),
            acs=sum(r.acs for r in layers),
            dense_macs=sum(r.dense_macs for r in layers),
            params=params,
            e_mac_pj=self.e_mac_pj,
            e_ac_pj=self.e_ac_pj,
            samples=samples,
            layers=layers,
        )


def _call(model: nn.Module, inputs: Any, device: torch.device | None) -> Any:
    def move(x):
        return x.to(device) if device is not None and isinstance(x, torch.Tensor) else x

    if isinstance(inputs, torch.Tensor):
        return model(move(inputs))
    if isinstance(inputs, (tuple, list)):
        return model(*[move(x) for x in inputs])
    if isinstance(inputs, dict):
        return model(**{k: move(v) for k, v in inputs.items()})
    raise ConfigError(
        f"inputs must be a tensor, a tuple/list of positional arguments or a dict of keyword arguments, "
        f"got {type(inputs).__name__}"
    )


def estimate_batches(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    samples: int = 1,
    e_mac_pj: float = E_MAC_45NM_PJ,
    e_ac_pj: float = E_AC_45NM_PJ,
    integer_counts: bool = True,
) -> EnergyReport:
    """:func:`estimate` over several calls, ``model(batch)`` for each batch; counts add up."""
    counter = EnergyCounter(model, e_mac_pj=e_mac_pj, e_ac_pj=e_ac_pj, integer_counts=integer_counts)
    params = next(model.parameters(), None)
    device = params.device if params is not None else None
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    ran = 0
    try:
        with torch.no_grad(), counter:
            for inputs in batches:
                _reset(model)
                _call(model, inputs, device)
                ran += 1
    finally:
        _reset(model)
        for m, mode in was_training.items():
            m.training = mode
    if not ran:
        raise ConfigError("no inputs to run the model on: give at least one batch")
    return counter.report(samples)


def estimate(
    model: nn.Module,
    inputs: Any,
    *,
    samples: int = 1,
    e_mac_pj: float = E_MAC_45NM_PJ,
    e_ac_pj: float = E_AC_45NM_PJ,
    integer_counts: bool = True,
) -> EnergyReport:
    """Run ``model`` once on ``inputs`` and count its operations and energy (module docstring).

    ``inputs``: a tensor (``model(inputs)``), a tuple / list (positional arguments) or a dict (keyword
    arguments); tensors are moved to the model's device. The model runs in eval mode without gradients,
    stateful spikecore neurons reset before and after; its training flags are restored. ``samples``: how
    many samples ``inputs`` holds (for the per-sample figures); ``e_mac_pj`` / ``e_ac_pj``: energy per
    MAC / AC in picojoules (45 nm defaults); ``integer_counts``: see :class:`EnergyCounter`.
    """
    return estimate_batches(
        model, [inputs], samples=samples, e_mac_pj=e_mac_pj, e_ac_pj=e_ac_pj, integer_counts=integer_counts
    )


def _reset(model: nn.Module) -> None:
    from .neuron.module import reset

    reset(model)


# -- reports for the packages' analyses --------------------------------------------------------------------
def comparison_markdown(reports: dict[str, EnergyReport], max_rows: int | None = 25) -> str:
    """Markdown: one summary row per mode (per sample), the change of each mode against the last one (the
    analyses put the mechanism-off mode last), then each mode's largest layers."""
    lines = [
        "# Operations and theoretical energy",
        "",
        f"Per sample. {CONVENTION}. E_MAC = {next(iter(reports.values())).e_mac_pj} pJ, "
        f"E_AC = {next(iter(reports.values())).e_ac_pj} pJ.",
        "",
        "| mode | params (M) | dense GMACs (papers' GFLOPs) | GFLOPs (2xMAC) | GMACs | GACs | energy (mJ) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, r in reports.items():
        s = r.samples
        lines.append(
            f"| {mode} | {r.params / 1e6:.4f} | {r.dense_macs / s / 1e9:.4g} | {r.flops / s / 1e9:.4g} | "
            f"{r.macs / s / 1e9:.4g} | {r.acs / s / 1e9:.4g} | {r.energy_mj / s:.4g} |"
        )
    if len(reports) > 1:
        *others, (last, base) = reports.items()
        lines.append("")
        for mode, r in others:
            e0, e1 = base.energy_mj / base.samples, r.energy_mj / r.samples
            d0, d1 = base.dense_macs / base.samples, r.dense_macs / r.samples
            de = f"{(e1 / e0 - 1) * 100:+.2f}%" if e0 else "n/a"
            dd = f"{(d1 / d0 - 1) * 100:+.2f}%" if d0 else "n/a"
            lines.append(
                f"- {mode} against {last}: energy {de}, dense MACs {dd}, params {r.params - base.params:+d}"
            )
    for mode, r in reports.items():
        lines += ["", f"## {mode}", "", r.markdown(max_rows)]
    return "\n".join(lines) + "\n"


def plot_comparison(reports: dict[str, EnergyReport], path: Path) -> None:
    """Bar chart of the energy per sample of each mode, split into its MAC and AC parts."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    modes = list(reports)
    mac = [r.e_mac_pj * r.macs * 1e-9 / r.samples for r in reports.values()]
    ac = [r.e_ac_pj * r.acs * 1e-9 / r.samples for r in reports.values()]
    fig = Figure(figsize=(1.6 + 1.4 * len(modes), 3.4))
    ax = fig.subplots()
    ax.bar(modes, mac, label="MAC (real-valued input)")
    ax.bar(modes, ac, bottom=mac, label="AC (spike input)")
    ax.set(title="theoretical energy per sample", ylabel="mJ")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_comparison(reports: dict[str, EnergyReport], out: str | Path) -> dict[str, str]:
    """Write ``energy.md`` and ``energy.png`` into ``out`` for the packages' ``analyze``; returns their
    names."""
    if not reports:
        raise ConfigError("no energy reports to write")
    out = Path(out)
    (out / "energy.md").write_text(comparison_markdown(reports))
    plot_comparison(reports, out / "energy.png")
    return {"markdown": "energy.md", "figure": "energy.png"}


# -- command line ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m spikecore.energy MODEL``: parameters, dense MACs and FLOPs of a registered spikecore
    backbone at full size (random weights, one random input; the energy needs trained weights)."""
    from .models import create_model, list_models

    ap = argparse.ArgumentParser(prog="python -m spikecore.energy", description=main.__doc__)
    ap.add_argument("model", help=f"one of: {', '.join(list_models())}")
    ap.add_argument("--T", type=int, default=None, help="time steps (default: the model's)")
    ap.add_argument("--num_classes", type=int, default=None)
    ap.add_argument("--img_size", type=int, default=None)
    ap.add_argument("--rows", type=int, default=20, help="layers to list")
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in (("T", args.T), ("num_classes", args.num_classes)) if v is not None}
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    try:
        model = create_model(args.model, **overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    x = torch.rand(1, model.in_chans, *model.img_size)
    r = estimate(model, x)
    print(
        f"{args.model}: T={model.T}, {r.params:,} parameters, {r.dense_macs / 1e9:.4f} G dense MACs "
        f"(the papers' GFLOPs), {r.flops / 1e9:.4f} GFLOPs (2 x MAC), per {model.T}-step sample"
    )
    print("largest layers by energy (random weights: not a trained model's firing rates):")
    print(r.markdown(args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
