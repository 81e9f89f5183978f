"""What the packages' ``analyze`` commands share: firing rates of every spiking layer, and their plot."""

from collections import defaultdict
from pathlib import Path

import torch

from ..neuron.module import LIF


class FiringRates:
    """Forward hooks on every spikecore LIF of ``model``: mean output (spikes per neuron and step) per
    layer over everything seen until :meth:`remove`."""

    def __init__(self, model: torch.nn.Module):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.handles = [
            m.register_forward_hook(self._hook(name))
            for name, m in model.named_modules()
            if isinstance(m, LIF)
        ]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.sums[name] += float(output.detach().float().sum())
            self.counts[name] += output.numel()

        return hook

    def rates(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k]}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def plot_firing_rates(rates_by_mode: dict[str, dict[str, float]], path: Path, label_size: float = 6) -> None:
    """One bar per spiking layer and mode (e.g. with and without feedback), written to ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(10, 3.6))
    ax = fig.subplots()
    width = 0.8 / max(len(rates_by_mode), 1)
    names: list[str] = []
    for j, (mode, rates) in enumerate(rates_by_mode.items()):
        names = list(rates)
        ax.bar([i + j * width for i in range(len(names))], list(rates.values()), width, label=mode)
    ax.set(title="firing rate per spiking layer", ylabel="spikes / neuron / step")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=label_size)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
