"""``spiliformer analyze``: where attention goes, with lateral inhibition and without, on a checkpoint.

The paper's claim is that lateral inhibition stops attention being spent on irrelevant tokens. Every
measure runs twice on the same weights and batches: SpiLiFormer as trained (pass 2, the evaluated output)
and the same network with lateral inhibition off (FF-LiDiff -> QKTA, FB-LiDiff -> SSA, no feedback).

1. **Attention mass per token**, per block. Token-mask attention (FF-LiDiff, QKTA): the mask's spikes
   A[t, h, n]. SSA-style attention (FB-LiDiff, SSA): the mass key token j receives, sum_i Q_i . K_j over
   queries i (the column sums of the unnormalised map Q K^T, per head and step). The DVS K^T V difference
   has no single map; there the attention output's spikes per token are used. The mass is summed over
   steps and heads.
2. **Foreground share**: sum of mass on foreground tokens / total mass, with a token's foreground weight
   the fraction of its pixels in the foreground mask (pooled to the block's token grid). ``chance`` is the
   share a uniform mass would give (the mean foreground fraction). Foreground: ``--foreground auto``
   (images: pixels brighter than the midpoint of the image's range, i.e. the digit's pixels for the
   embedded digits; events: pixels with any event) or a ``.npy`` / ``.pt`` file of masks ``[S, H, W]`` in
   the split's order.
3. **Attention entropy**: of the mass distribution over tokens, per step, sample and head (skipping
   silent ones), divided by log N (1 = spread evenly, 0 = one token), averaged.
4. **Firing rates** of every spiking layer (mean spikes per neuron and step).
5. **Operations and theoretical energy** (``spikecore.energy``: MACs on real-valued input, ACs = dense MACs
   x input firing rate on spikes, E = 4.6 pJ x MACs + 0.9 pJ x ACs; SpiLiFormer's both passes counted),
   per sample and per layer, in each mode's ``energy`` entry and ``energy.md`` / ``energy.png``.
"""

import json
import math
from argparse import ArgumentParser, Namespace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import spikecore
from spikecore.attention import SpikingSelfAttention
from spikecore.energy import estimate_batches, write_comparison
from spikecore.train.probes import FiringRates, plot_firing_rates

from .attention import KVDifferenceAttention
from .model import SpiLiFormer, lateral_inhibition_off

N_SHOW = 4  # samples in the attention-map figure


def add_arguments(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--foreground",
        default="auto",
        help="'auto' (bright pixels of images, pixels with events) or a .npy/.pt file of [S, H, W] masks",
    )


# -- foreground --------------------------------------------------------------------------------------
def auto_foreground(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` masks from ``[B, C, H, W]`` images or ``[T, B, C, H, W]`` event frames."""
    if x.dim() == 5:
        return x.abs().sum(dim=(0, 2)) > 0
    gray = x.mean(1)
    lo, hi = gray.amin(dim=(1, 2), keepdim=True), gray.amax(dim=(1, 2), keepdim=True)
    return gray > (lo + hi) / 2


def load_masks(path: str) -> torch.Tensor:
    """User-supplied ``[S, H, W]`` foreground masks (nonzero = foreground)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"foreground mask file {p} does not exist")
    masks = torch.as_tensor(np.load(p)) if p.suffix == ".npy" else torch.load(p, weights_only=True)
    if masks.dim() != 3:
        raise ValueError(f"foreground masks must be [samples, H, W], got {tuple(masks.shape)}")
    return masks != 0


def token_grid(n: int, height: int, width: int) -> tuple[int, int]:
    """The (rows, cols) of ``n`` tokens laid out with the input's aspect ratio."""
    rows = max(1, round(math.sqrt(n * height / width)))
    if n % rows:
        raise ValueError(f"{n} tokens do not form a grid with the input's aspect {height}x{width}")
    return rows, n // rows


def token_weights(mask: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, N]``: the foreground fraction of each token's pixels."""
    grid = token_grid(n, *mask.shape[1:])
    return F.adaptive_avg_pool2d(mask[:, None].float(), grid).flatten(1)


# -- probes ------------------------------------------------------------------------------------------
def token_mass(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``[T, B, H, N]`` attention mass per token (see the module docstring, item 1)."""
    if isinstance(attn, KVDifferenceAttention):
        return spikecore.attention.split_heads(out, attn.num_heads).sum(3)
    if isinstance(attn, SpikingSelfAttention):  # also FB-LiDiff: sum_i Q_i . K_j per head
        qh = spikecore.attention.split_heads(q, attn.num_heads)
        kh = spikecore.attention.split_heads(k, attn.num_heads)
        return (qh.sum(-1, keepdim=True) * kh).sum(3)
    return out.squeeze(3)  # token-mask attention: the attention LIF's output is the mask [T, B, H, 1, N]


class AttentionProbe:
    """Forward hooks on each block's attention: keeps the last call's per-token mass (stage 3 runs twice
    in SpiLiFormer; the second pass is the evaluated one), and every LIF's firing."""

    def __init__(self, backbone: nn.Module, model: nn.Module):
        self.attns = [block.attn for block in backbone.blocks]
        self.captured: list[dict[str, torch.Tensor]] = [{} for _ in self.attns]
        self.rates = FiringRates(model)
        self.handles = []
        for i, attn in enumerate(self.attns):
            for part in ("q", "k", "attn"):
                lif = getattr(attn, f"{part}_lif")
                self.handles.append(lif.register_forward_hook(self._keep(i, part)))

    def _keep(self, i: int, part: str):
        def hook(module, inputs, output):
            self.captured[i][part] = output.detach()

        return hook

    def masses(self) -> list[torch.Tensor]:
        return [
            token_mass(a, c["q"], c["k"], c["attn"]) for a, c in zip(self.attns, self.captured, strict=True)
        ]

    def firing_rates(self) -> dict[str, float]:
        return self.rates.rates()

    def remove(self) -> None:
        self.rates.remove()
        for h in self.handles:
            h.remove()


class LayerStats:
    """Running sums for one block: foreground mass, total mass, chance, entropy."""

    def __init__(self):
        self.fg = self.total = self.fg_tokens = self.bg_tokens = 0.0
        self.entropy = self.entropy_n = 0.0

    def add(self, mass: torch.Tensor, w: torch.Tensor) -> None:
        """``mass`` ``[T, B, H, N]``; ``w`` ``[B, N]`` foreground weights."""
        per_token = mass.double().sum(dim=(0, 2))  # [B, N]
        w = w.double()
        self.fg += float((per_token * w).sum())
        self.total += float(per_token.sum())
        self.fg_tokens += float(w.sum())
        self.bg_tokens += float((1 - w).sum())
        n = mass.shape[-1]
        sums = mass.double().sum(-1, keepdim=True)
        live = sums.squeeze(-1) > 0
        if n > 1 and live.any():
            p = mass.double() / sums.clamp_min(1e-12)
            h = -(p * torch.log(p.clamp_min(1e-300))).sum(-1) / math.log(n)
            self.entropy += float(h[live].sum())
            self.entropy_n += int(live.sum())

    def result(self) -> dict:
        nan = float("nan")
        tokens = self.fg_tokens + self.bg_tokens
        return {
            "fg_share": self.fg / self.total if self.total else nan,
            "chance": self.fg_tokens / tokens if tokens else nan,
            "mass_per_fg_token": self.fg / self.fg_tokens if self.fg_tokens else nan,
            "mass_per_bg_token": (self.total - self.fg) / self.bg_tokens if self.bg_tokens else nan,
            "entropy": self.entropy / self.entropy_n if self.entropy_n else nan,
        }


def measure(net: nn.Module, backbone: nn.Module, batches: list, masks: list, device: torch.device) -> dict:
    """The measures for ``net`` (SpiLiFormer or a plain backbone) on ``batches`` with foreground ``masks``."""
    probe = AttentionProbe(backbone, net)
    stats = [LayerStats() for _ in backbone.blocks]
    correct, total, maps = 0, 0, None
    try:
        with torch.no_grad():
            for (x, y), mask in zip(batches, masks, strict=True):
                logits = net(x.to(device))
                correct += int((logits.argmax(-1).cpu() == y).sum())
                total += len(y)
                masses = [m.cpu() for m in probe.masses()]
                for s, m in zip(stats, masses, strict=True):
                    s.add(m, token_weights(mask, m.shape[-1]))
                if maps is None:
                    maps = [m[:, :N_SHOW].sum(dim=(0, 2)) for m in masses]  # [N_SHOW, N] per block
    finally:
        probe.remove()
    kinds = [type(a).__name__ for a in probe.attns]
    layers = [
        dict(block=i, attention=k, **s.result()) for i, (k, s) in enumerate(zip(kinds, stats, strict=True))
    ]
    return {
        "accuracy": correct / total,
        "layers": layers,
        "firing_rates": probe.firing_rates(),
        "_maps": maps,
    }


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batches(datamodule, split: str, max_batches: int, foreground: str) -> tuple[list, list]:
    datamodule.prepare_data()
    datamodule.setup("validate" if split == "val" else "test")
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    user = None if foreground == "auto" else load_masks(foreground)
    batches, masks, seen = [], [], 0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        x = batch[0].transpose(0, 1).contiguous() if batch[0].dim() == 5 else batch[0]  # frames: T first
        if user is None:
            mask = auto_foreground(x)
        else:
            if seen + len(batch[1]) > len(user):
                raise ValueError(f"{len(user)} foreground masks for more samples of the {split} split")
            size = x.shape[-2:]
            mask = F.interpolate(user[seen : seen + len(batch[1]), None].float(), size=size)[:, 0] > 0.5
        seen += len(batch[1])
        batches.append((x, batch[1]))
        masks.append(mask)
    if not batches:
        raise ValueError(f"the {split} split is empty: nothing to analyse")
    return batches, masks


def analyze(model, datamodule, opts: Namespace) -> dict:
    """Run the measures on ``opts.max_batches`` batches of ``opts.split``; write JSON and plots."""
    device = _device(opts.device)
    net = model.net.to(device).eval()
    batches, masks = _batches(datamodule, opts.split, opts.max_batches, getattr(opts, "foreground", "auto"))
    results = {
        "arch": model.hparams.arch,
        "split": opts.split,
        "samples": sum(len(b[1]) for b in batches),
        "ckpt_path": opts.ckpt_path,
        "foreground": getattr(opts, "foreground", "auto"),
        "estimators": __doc__.split("1. ", 1)[1].strip(),
        "modes": {},
    }
    if isinstance(net, SpiLiFormer):
        modes = {"spiliformer": (net, net.backbone)}
        try:
            base = lateral_inhibition_off(net).eval()
            modes["lateral_inhibition_off"] = (base, base)
        except ValueError as err:  # the DVS K^T V difference has no plain form with the same weights
            results["note"] = str(err)
    else:  # a baseline checkpoint (trained with lateral_inhibition: false)
        modes = {"qkformer": (net, net)}
    maps, energy = {}, {}
    for mode, (m, backbone) in modes.items():
        r = measure(m, backbone, batches, masks, device)
        maps[mode] = r.pop("_maps")
        energy[mode] = estimate_batches(m, [x for x, _ in batches], samples=results["samples"])
        r["energy"] = energy[mode].to_dict()
        results["modes"][mode] = r
    out = Path(opts.out)  # checked writable by the CLI before the work started
    (out / "analysis.json").write_text(json.dumps(results, indent=2))
    plot(results, out)
    plot_maps(batches[0][0], masks[0], maps, out)
    write_comparison(energy, out)  # energy.md, energy.png
    summary = {
        mode: {
            "accuracy": r["accuracy"],
            "fg_share": [round(layer["fg_share"], 4) for layer in r["layers"]],
            "chance": [round(layer["chance"], 4) for layer in r["layers"]],
            "entropy": [round(layer["entropy"], 4) for layer in r["layers"]],
        }
        for mode, r in results["modes"].items()
    }
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'analysis.json'} and plots to {out}")
    return results


# -- plots -------------------------------------------------------------------------------------------
def plot(results: dict, out: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    modes = results["modes"]
    width = 0.8 / max(len(modes), 1)
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    for j, (mode, r) in enumerate(modes.items()):
        blocks = [layer["block"] for layer in r["layers"]]
        xs = [b + j * width for b in blocks]
        axes[0].bar(xs, [layer["fg_share"] for layer in r["layers"]], width, label=mode)
        axes[1].bar(xs, [layer["entropy"] for layer in r["layers"]], width, label=mode)
    first = next(iter(modes.values()))["layers"]
    axes[0].scatter(
        [layer["block"] + 0.4 - width / 2 for layer in first],
        [layer["chance"] for layer in first],
        marker="_",
        s=300,
        color="k",
        label="chance",
    )
    axes[0].set(title="attention mass on foreground tokens", xlabel="block", ylabel="share")
    axes[1].set(title="attention entropy (normalised)", xlabel="block", ylabel="H / log N")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "attention_allocation.png", dpi=120)
    plot_firing_rates(
        {m: r["firing_rates"] for m, r in modes.items()}, out / "firing_rates.png", label_size=5
    )


def plot_maps(x: torch.Tensor, mask: torch.Tensor, maps: dict, out: Path) -> None:
    """Per-block attention mass over the input for the first samples: one row per sample and mode."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    images = x.abs().sum(dim=(0, 2)) if x.dim() == 5 else x.mean(1)  # events: counts; images: gray
    n = min(N_SHOW, len(images))
    n_blocks = len(next(iter(maps.values())))
    rows = [(s, mode) for s in range(n) for mode in maps]
    fig = Figure(figsize=(1.6 * (n_blocks + 1), 1.6 * len(rows)))
    axes = fig.subplots(len(rows), n_blocks + 1, squeeze=False)
    h, w = images.shape[-2:]
    for r, (s, mode) in enumerate(rows):
        img = images[s].float()
        axes[r, 0].imshow(img, cmap="gray")
        axes[r, 0].contour(mask[s].float(), levels=[0.5], colors="lime", linewidths=0.6)
        axes[r, 0].set_ylabel(mode, fontsize=6)
        for b, m in enumerate(maps[mode]):
            grid = token_grid(m.shape[-1], h, w)
            heat = F.interpolate(m[s].reshape(1, 1, *grid).float(), size=(h, w), mode="nearest")[0, 0]
            axes[r, b + 1].imshow(img, cmap="gray")
            axes[r, b + 1].imshow(heat, cmap="inferno", alpha=0.6)
            if r == 0:
                axes[r, b + 1].set_title(f"block {b}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "attention_maps.png", dpi=120)
