"""``tdformer analyze``: the paper's two mechanisms, measured on a checkpoint, plus firing rates.

Each measure runs twice on the same weights and batches: with the top-down feedback as trained, and with
it switched off at inference (no S_td term; everything else equal). Outputs ``analysis.json`` and PNG plots.

1. **Mutual information between successive time steps** of the last block's output. Estimator: every
   output unit (channel x token) is a binary variable (spike / no spike; real-valued outputs are
   binarised at > 0); for each pair of steps (t, t+1) the plug-in MI of the 2 x 2 joint distribution over
   samples, with the Miller-Madow bias correction, averaged over units, in bits. The same for successive
   segments with the unit's spike count over a segment (values 0..T') as the variable.
2. **Gradient norm reaching each time step**: the L2 norm (per sample, averaged) of d loss / d input of
   the first block at step t, the loss being the cross-entropy of the evaluated (last-segment) output.
   Thm 4.3's claim is that feedback keeps this from vanishing for early steps.
3. **Firing rates** of every spiking layer (mean spikes per neuron and step).
"""

import json
import math
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn.functional as F

import spikecore
from spikecore.train.probes import FiringRates, plot_firing_rates


def binary_mi_bits(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over units of the Miller-Madow corrected plug-in MI (bits) between binary ``a`` and ``b``,
    each ``[samples, units]``."""
    return discrete_mi_bits(a.long(), b.long(), 2)


def discrete_mi_bits(a: torch.Tensor, b: torch.Tensor, levels: int) -> float:
    """Mean over units of the Miller-Madow corrected plug-in MI (bits) between integer variables in
    ``[0, levels)``; ``a``, ``b``: ``[samples, units]``."""
    n, units = a.shape
    if n < 2:
        raise ValueError("mutual information needs at least 2 samples")
    joint = torch.zeros(units, levels * levels, dtype=torch.float64)
    joint.scatter_add_(1, (a * levels + b).T.contiguous(), torch.ones(units, n, dtype=torch.float64))
    p = joint / n
    pa = p.view(units, levels, levels).sum(2)
    pb = p.view(units, levels, levels).sum(1)

    def entropy(q: torch.Tensor) -> torch.Tensor:  # nats, with the Miller-Madow term (bins used - 1) / 2n
        plug_in = -(q * torch.log(q.clamp_min(1e-300))).sum(1)
        return plug_in + ((q > 0).sum(1) - 1).clamp_min(0) / (2 * n)

    mi = (entropy(pa) + entropy(pb) - entropy(p)).clamp_min(0) / math.log(2)
    return float(mi.mean())


def _first_block_inputs(backbone: torch.nn.Module, store: list):
    """Keep (with grad) the input of the first block at every call: one tensor per segment."""

    def hook(module, args, kwargs):
        x = args[0]
        if x.requires_grad:
            x.retain_grad()
        store.append(x)

    return backbone.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)


def measure(net: torch.nn.Module, batches: list, device: torch.device) -> dict:
    """MI, gradient norms and firing rates of ``net`` (a TDFormer or a plain backbone) on ``batches``."""
    backbone = getattr(net, "backbone", net)
    rates = FiringRates(net)
    feats_all, grad_steps, n_grad = [], None, 0
    try:
        for x, y in batches:
            x = x.to(device)
            y = y.to(device)
            x = x.transpose(0, 1).contiguous() if x.dim() == 5 else x
            inputs: list[torch.Tensor] = []
            handle = _first_block_inputs(backbone, inputs)
            try:
                with torch.enable_grad():
                    if hasattr(net, "forward_segments"):
                        logits, feats = net.forward_segments(x, return_features=True)
                    else:
                        spikecore.reset(net)
                        seq = x.unsqueeze(0).expand(net.T, *x.shape) if x.dim() == 4 else x
                        feats = [net.forward_features(seq)]
                        logits = [net.forward_head(feats[0])]
                    loss = F.cross_entropy(logits[-1].float(), y)
                    loss.backward()
            finally:
                handle.remove()
            grads = torch.cat([i.grad if i.grad is not None else torch.zeros_like(i) for i in inputs])
            per_step = grads.flatten(2).norm(dim=2).mean(1).double()  # [T]: L2 per sample, mean over batch
            grad_steps = per_step if grad_steps is None else grad_steps + per_step
            n_grad += 1
            feats_all.append([f.detach().flatten(3) if f.dim() > 4 else f.detach() for f in feats])
            net.zero_grad(set_to_none=True)
    finally:
        rates.remove()
    seg_feats = [
        torch.cat([b[n] for b in feats_all], dim=1) for n in range(len(feats_all[0]))
    ]  # [T', S, D, N]
    spikes = (torch.cat(seg_feats) > 0).flatten(2)  # [T, samples, units]
    T = spikes.shape[0]
    step_mi = [binary_mi_bits(spikes[t], spikes[t + 1]) for t in range(T - 1)]
    counts = [(f > 0).flatten(2).sum(0) for f in seg_feats]  # spike counts per segment [samples, units]
    levels = seg_feats[0].shape[0] + 1
    seg_mi = [discrete_mi_bits(counts[n], counts[n + 1], levels) for n in range(len(counts) - 1)]
    return {
        "mi_steps_bits": step_mi,
        "mi_segments_bits": seg_mi,
        "grad_norm_per_step": (grad_steps / n_grad).tolist(),
        "firing_rates": rates.rates(),
        "accuracy_last_segment": None,
    }


def analyze(model, datamodule, opts: Namespace) -> dict:
    """Run the measures on ``opts.max_batches`` batches of ``opts.split``; write JSON and plots."""
    device = torch.device(
        "cuda"
        if opts.device == "auto" and torch.cuda.is_available()
        else ("cpu" if opts.device == "auto" else opts.device)
    )
    net = model.net.to(device).eval()
    datamodule.prepare_data()
    datamodule.setup("validate" if opts.split == "val" else "test")
    loader = datamodule.val_dataloader() if opts.split == "val" else datamodule.test_dataloader()
    batches = []
    for i, batch in enumerate(loader):
        if i >= opts.max_batches:
            break
        batches.append((batch[0], batch[1]))
    if not batches:
        raise ValueError(f"the {opts.split} split is empty: nothing to analyse")
    modes = {"feedback": True, "no_feedback": False} if hasattr(net, "feedback") else {"backbone": None}
    trained_feedback = getattr(net, "feedback", None)
    results = {
        "arch": model.hparams.arch,
        "segments": getattr(net, "segments", 1),
        "split": opts.split,
        "samples": sum(len(b[1]) for b in batches),
        "ckpt_path": opts.ckpt_path,
        "estimators": __doc__.split("1. ", 1)[1].strip(),
        "modes": {},
    }
    try:
        for mode, flag in modes.items():
            if flag is not None:
                net.feedback = flag
            r = measure(net, batches, device)
            with torch.no_grad():
                correct = sum(int((model(x.to(device)).argmax(-1) == y.to(device)).sum()) for x, y in batches)
            r["accuracy_last_segment"] = correct / results["samples"]
            results["modes"][mode] = r
    finally:
        if trained_feedback is not None:
            net.feedback = trained_feedback
    out = Path(opts.out)  # checked writable by the CLI before the work started
    (out / "analysis.json").write_text(json.dumps(results, indent=2))
    plot(results, out)
    summary = {
        m: {k: r[k] for k in ("mi_steps_bits", "grad_norm_per_step", "accuracy_last_segment")}
        for m, r in results["modes"].items()
    }
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'analysis.json'} and plots to {out}")
    return results


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = results["modes"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for mode, r in modes.items():
        steps = range(1, len(r["grad_norm_per_step"]) + 1)
        axes[0].plot(steps, r["grad_norm_per_step"], marker="o", label=mode)
        pairs = [f"{t}-{t + 1}" for t in range(1, len(r["mi_steps_bits"]) + 1)]
        axes[1].plot(pairs, r["mi_steps_bits"], marker="o", label=mode)
    axes[0].set(title="gradient norm reaching each step", xlabel="time step", ylabel="|dL/dx_t|")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    axes[1].set(title="MI between successive steps", xlabel="steps", ylabel="bits per unit")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "mechanisms.png", dpi=120)
    plt.close(fig)
    plot_firing_rates({m: r["firing_rates"] for m, r in modes.items()}, out / "firing_rates.png")
