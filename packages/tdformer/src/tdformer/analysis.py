"""``tdformer analyze``: the paper's two mechanisms and its analyses, measured on a checkpoint.

Each measure runs twice on the same weights and batches: with the top-down feedback as trained, and with
it switched off at inference (no S_td term; everything else equal). Outputs ``analysis.json`` and PNG plots.

1. **Mutual information across time steps** of the last block's output, the paper's Fig. 1: the full
   T x T matrix ``MI[t1][t2]`` (``mi_matrix_bits``; ``mi_steps_bits`` is its superdiagonal). Estimator:
   every output unit (channel x token) is a binary variable (spike / no spike; real-valued outputs are
   binarised at > 0); for each pair of steps the plug-in MI of the 2 x 2 joint distribution over samples,
   with the Miller-Madow bias correction, averaged over units, in bits. The matrix is symmetric and its
   diagonal is each step's entropy (MI(X, X) = H(X)). The same for successive segments with the unit's
   spike count over a segment (values 0..T') as the variable.
2. **Gradients along time.** (a) End to end: the L2 norm (per sample, averaged) of d loss / d input of
   the first block at step t. The loss is one function of the segments' features H_n for the feedback
   model and a baseline alike (``--grad_loss``: ``last`` = CE(y, head(H_N)), default; ``segments`` =
   sum_n alpha_n CE(y, head(H_n)); ``all`` = CE(y, head(H_1..N))); a plain backbone's T steps are cut into
   the checkpoint's segments to be scored. (b) Theorem 4.3's sensitivity ``dH_j(t2) / dH_j(t1)`` of each
   spiking layer's membrane (``epsilon``; eps(t) is the t2 = t1 + 1 case), by default under the theorem's
   assumptions (rectangular surrogate, soft reset, reset not detached; ``--epsilon``), with the (a)
   gradient norm of the same neurons beside it; see ``tdformer.gradients``.
3. **Firing rates** of every spiking layer (mean spikes per neuron and step).
4. **Operations and theoretical energy** (``spikecore.energy``: MACs on real-valued input, ACs = dense MACs
   x input firing rate on spikes, E = 4.6 pJ x MACs + 0.9 pJ x ACs), per sample and per layer, in each
   mode's ``energy`` entry and ``energy.md`` / ``energy.png``.
5. **The PM's surrogate gradients** with and without its clamp, the paper's Fig. 3 (feedback models
   only): histograms of sigma'(H - V_th) of the PM token-mixer LIF, ``pm_surrogate_gradients``.
"""

import json
import math
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn.functional as F

import spikecore
from spikecore.energy import estimate_batches, write_comparison
from spikecore.train.probes import FiringRates, plot_firing_rates

from .gradients import NEURON_SETTINGS, NeuronRecorder, SensitivityStats, pm_surrogate_gradients


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


def mi_matrix_bits(spikes: torch.Tensor) -> list[list[float]]:
    """The T x T matrix ``MI[t1][t2]`` = :func:`binary_mi_bits` of the units at step t1 and at step t2
    (``spikes``: ``[T, samples, units]``, binary). Symmetric; the diagonal is each step's mean Miller-Madow
    corrected entropy (``MI(X, X) = H(X)``)."""
    T = spikes.shape[0]
    m = [[0.0] * T for _ in range(T)]
    for t1 in range(T):
        for t2 in range(t1, T):
            m[t1][t2] = m[t2][t1] = binary_mi_bits(spikes[t1], spikes[t2])
    return m


GRAD_LOSSES = {
    "last": "CE(y, head(H_N)): the last segment's output, what TDFormer is evaluated with",
    "segments": "sum_n alpha_n CE(y, head(H_n)): TDFormer's training objective",
    "all": "CE(y, head(H_1..N)): the head over all T steps, what the plain backbone is evaluated with",
}


def segment_features(net: torch.nn.Module, x: torch.Tensor, segments: int):
    """``([H_1, ..., H_N], head)``: the features of each segment (``[T', B, D, N]``) and the head that maps
    features to logits. A TDFormer runs its segments (feedback as set); a plain backbone runs all T steps
    at once and its features are cut into the same N segments, so both are scored alike."""
    if hasattr(net, "forward_segments"):
        _, feats = net.forward_segments(x, return_features=True)
        return feats, net.backbone.forward_head
    spikecore.reset(net)
    h = net.forward_features(net.to_sequence(x))
    if h.shape[0] % segments:
        raise ValueError(f"T={h.shape[0]} steps cannot be split into {segments} equal segments")
    return list(h.chunk(segments)), net.forward_head


def scoring_loss(head, feats: list[torch.Tensor], y: torch.Tensor, loss: str, weights: list[float]):
    """The loss the gradients are measured with: the same function of the segments' features for the
    feedback model and the baseline (see :data:`GRAD_LOSSES`; plain cross-entropy, no label smoothing)."""
    if loss == "last":
        return F.cross_entropy(head(feats[-1]).float(), y)
    if loss == "segments":
        parts = [F.cross_entropy(head(f).float(), y) for f in feats]
        return sum(w * part for w, part in zip(weights, parts, strict=True))
    if loss == "all":
        return F.cross_entropy(head(torch.cat(feats)).float(), y)
    raise ValueError(f"grad_loss must be one of {', '.join(GRAD_LOSSES)}, got {loss!r}")


def segment_loss_weights(weights: list[float] | None, segments: int) -> list[float]:
    """alpha_n normalised to sum 1: the given ones (a checkpoint's ``segment_weights``) when there is one
    per segment, else proportional to n (the training default)."""
    if weights is None or len(weights) != segments:
        weights = [float(n + 1) for n in range(segments)]
    total = float(sum(weights))
    return [w / total for w in weights]


def _per_step_norm(grads: list[torch.Tensor | None], inputs: list[torch.Tensor]) -> torch.Tensor:
    """``[T]``: the L2 norm per sample of each step's gradient, averaged over the batch."""
    g = torch.cat(
        [gi if gi is not None else torch.zeros_like(i) for gi, i in zip(grads, inputs, strict=True)]
    )
    return g.flatten(2).norm(dim=2).mean(1).double().cpu()


def _batch(x: torch.Tensor, y: torch.Tensor, device: torch.device):
    x = x.to(device)
    return (x.transpose(0, 1).contiguous() if x.dim() == 5 else x), y.to(device)


def measure(
    net: torch.nn.Module,
    batches: list,
    device: torch.device,
    *,
    segments: int = 1,
    loss: str = "last",
    weights: list[float] | None = None,
    epsilon: str = "theorem",
    epsilon_neurons: int = 8,
    epsilon_batches: int = 1,
) -> dict:
    """MI, gradients along time and firing rates of ``net`` (a TDFormer or a plain backbone) on
    ``batches``. A plain backbone is scored over ``segments`` segments like the feedback model (a TDFormer
    uses its own); ``loss`` and ``weights`` define the loss (:func:`scoring_loss`); ``epsilon`` the neurons
    Theorem 4.3's sensitivity is measured with (``"theorem"``, ``"trained"``, or ``"off"``)."""
    backbone = getattr(net, "backbone", net)
    segments = getattr(net, "segments", segments)
    weights = segment_loss_weights(weights, segments)
    rates = FiringRates(net)
    feats_all, grad_steps, n_grad = [], None, 0
    try:
        for xb, yb in batches:
            x, y = _batch(xb, yb, device)
            inputs: list[torch.Tensor] = []
            handle = _first_block_inputs(backbone, inputs)
            try:
                with torch.enable_grad():
                    feats, head = segment_features(net, x, segments)
                    scoring_loss(head, feats, y, loss, weights).backward()
            finally:
                handle.remove()
            per_step = _per_step_norm([i.grad for i in inputs], inputs)
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
    mi = mi_matrix_bits(spikes)
    counts = [(f > 0).flatten(2).sum(0) for f in seg_feats]  # spike counts per segment [samples, units]
    levels = seg_feats[0].shape[0] + 1
    seg_mi = [discrete_mi_bits(counts[n], counts[n + 1], levels) for n in range(len(counts) - 1)]
    result = {
        "mi_matrix_bits": mi,
        "mi_steps_bits": [mi[t][t + 1] for t in range(T - 1)],
        "mi_segments_bits": seg_mi,
        "grad_norm_per_step": (grad_steps / n_grad).tolist(),
        "firing_rates": rates.rates(),
        "accuracy_last_segment": None,
    }
    if epsilon != "off" and epsilon_neurons > 0 and epsilon_batches > 0:
        result["epsilon"] = measure_epsilon(
            net,
            batches[:epsilon_batches],
            device,
            segments=segments,
            loss=loss,
            weights=weights,
            neurons=epsilon,
            per_layer=epsilon_neurons,
        )
    return result


def measure_epsilon(
    net: torch.nn.Module,
    batches: list,
    device: torch.device,
    *,
    segments: int,
    loss: str,
    weights: list[float],
    neurons: str = "theorem",
    per_layer: int = 8,
) -> dict:
    """Theorem 4.3's ``E[t1, t2] = dH_j(t2) / dH_j(t1)`` per spiking layer (``tdformer.gradients``), and the
    end-to-end gradient norm per step of the same loss, both with ``neurons`` ("theorem": rectangular
    surrogate, soft reset, reset not detached; "trained": the neurons as trained). The forward pass runs
    the plain PyTorch LIF loop; with "theorem" the soft reset changes the spikes themselves."""
    backbone = getattr(net, "backbone", net)
    stats = SensitivityStats(per_layer)
    grad_steps = None
    for xb, yb in batches:
        x, y = _batch(xb, yb, device)
        inputs: list[torch.Tensor] = []
        handle = _first_block_inputs(backbone, inputs)
        try:
            with torch.enable_grad(), NeuronRecorder(net, neurons, probe=True) as rec:
                feats, head = segment_features(net, x, segments)
                grads = torch.autograd.grad(
                    scoring_loss(head, feats, y, loss, weights), inputs, retain_graph=True, allow_unused=True
                )
                stats.add(rec, sum(f.shape[0] for f in feats))
        finally:
            handle.remove()
        per_step = _per_step_norm(list(grads), inputs)
        grad_steps = per_step if grad_steps is None else grad_steps + per_step
    return {
        "neurons": neurons,
        "grad_norm_per_step": (grad_steps / len(batches)).tolist(),
        **stats.summary(),
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
    hp = model.hparams
    segments = getattr(net, "segments", None) or int(hp.get("segments", 1))
    grad = dict(
        segments=segments,
        loss=getattr(opts, "grad_loss", "last"),
        weights=segment_loss_weights(hp.get("segment_weights"), segments),
        epsilon=getattr(opts, "epsilon", "theorem"),
        epsilon_neurons=getattr(opts, "epsilon_neurons", 8),
        epsilon_batches=getattr(opts, "epsilon_batches", 1),
    )
    results = {
        "arch": model.hparams.arch,
        "segments": getattr(net, "segments", 1),
        "split": opts.split,
        "samples": sum(len(b[1]) for b in batches),
        "ckpt_path": opts.ckpt_path,
        "estimators": __doc__.split("1. ", 1)[1].strip(),
        "gradient_loss": {
            "name": grad["loss"],
            "definition": GRAD_LOSSES[grad["loss"]],
            "segments": segments,
            "segment_weights": grad["weights"],
        },
        "modes": {},
    }
    energy = {}  # mode -> spikecore.energy.EnergyReport
    try:
        for mode, flag in modes.items():
            if flag is not None:
                net.feedback = flag
            r = measure(net, batches, device, **grad)
            with torch.no_grad():
                correct = sum(int((model(x.to(device)).argmax(-1) == y.to(device)).sum()) for x, y in batches)
            r["accuracy_last_segment"] = correct / results["samples"]
            inputs = [model.to_time_major(x) for x, _ in batches]  # energy: spikecore.energy's convention
            energy[mode] = estimate_batches(net, inputs, samples=results["samples"])
            r["energy"] = energy[mode].to_dict()
            results["modes"][mode] = r
        if trained_feedback and hasattr(net, "pm"):  # Fig. 3: the PM as trained, clamp on and off
            net.feedback = True
            bins = getattr(opts, "hist_bins", 40)
            results["pm_surrogate_gradients"] = pm_surrogate_gradients(net, batches, device, bins)
    finally:
        if trained_feedback is not None:
            net.feedback = trained_feedback
    out = Path(opts.out)  # checked writable by the CLI before the work started
    (out / "analysis.json").write_text(json.dumps(results, indent=2))
    plot(results, out)
    write_comparison(energy, out)  # energy.md, energy.png
    summary = {
        m: {k: r[k] for k in ("mi_matrix_bits", "grad_norm_per_step", "accuracy_last_segment")}
        | ({"epsilon_one_step": r["epsilon"]["one_step"]} if "epsilon" in r else {})
        for m, r in results["modes"].items()
    }
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'analysis.json'} and plots to {out}")
    return results


def plot(results: dict, out: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    modes = results["modes"]
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
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
    plot_firing_rates({m: r["firing_rates"] for m, r in modes.items()}, out / "firing_rates.png")
    plot_mi_matrices(modes, out / "mi_matrix.png")
    plot_gradients(modes, out / "gradients.png")
    if "pm_surrogate_gradients" in results:
        plot_pm_surrogate_gradients(results["pm_surrogate_gradients"], out / "pm_surrogate_gradients.png")


def add_arguments(ap) -> None:
    """``tdformer analyze``'s own options (the common ones come from spikecore's CLI)."""
    ap.add_argument(
        "--grad_loss",
        choices=tuple(GRAD_LOSSES),
        default="last",
        help="the loss the gradients along time are measured with, the same for the feedback model and a "
        "baseline: " + "; ".join(f"{k}: {v}" for k, v in GRAD_LOSSES.items()),
    )
    ap.add_argument(
        "--epsilon",
        choices=(*NEURON_SETTINGS, "off"),
        default="theorem",
        help="neurons Theorem 4.3's dH(t2)/dH(t1) is measured with: theorem (rectangular surrogate, soft "
        "reset, reset not detached), trained (as trained), off",
    )
    ap.add_argument("--epsilon_neurons", type=int, default=8, help="neurons sampled per spiking layer")
    ap.add_argument("--epsilon_batches", type=int, default=1, help="batches the sensitivity is measured on")
    ap.add_argument("--hist_bins", type=int, default=40, help="bins of the PM surrogate-gradient histogram")


def plot_mi_matrices(modes: dict, path: Path) -> None:
    """The paper's Fig. 1: one T x T MI heatmap per mode, on one colour scale, values written in."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    mats = {m: r["mi_matrix_bits"] for m, r in modes.items()}
    top = max(max(max(row) for row in m) for m in mats.values()) or 1.0
    fig = Figure(figsize=(4.2 * len(mats) + 0.8, 3.8))
    axes = fig.subplots(1, len(mats), squeeze=False)
    for ax, (mode, m) in zip(axes[0], mats.items(), strict=True):
        T = len(m)
        im = ax.imshow(m, vmin=0, vmax=top, cmap="viridis")
        for i in range(T):
            for j in range(T):
                if T <= 8:
                    ax.text(j, i, f"{m[i][j]:.3f}", ha="center", va="center", fontsize=7, color="w")
        ticks = range(T)
        ax.set_xticks(ticks, [str(t + 1) for t in ticks])
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
        ax.set(title=f"MI across steps: {mode}", xlabel="time step", ylabel="time step")
    fig.colorbar(im, ax=axes[0].tolist(), label="bits per unit")
    fig.savefig(path, dpi=120)


def plot_gradients(modes: dict, path: Path) -> None:
    """Gradients along time per mode: the end-to-end gradient norm per step (as trained, and with the
    neurons eps was measured with), eps(t) (mean |dH(t+1)/dH(t)| over layers) and its vanished fraction
    beside the fraction of neurons in the theorem's window, and mean |dH(T)/dH(t)| (the last step's reach)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(17, 3.6))
    axes = fig.subplots(1, 4)
    for k, (mode, r) in enumerate(modes.items()):
        color = f"C{k}"
        steps = list(range(1, len(r["grad_norm_per_step"]) + 1))
        axes[0].plot(steps, r["grad_norm_per_step"], marker="o", color=color, label=f"{mode}, as trained")
        eps = r.get("epsilon")
        if not eps or not eps["layers"]:
            continue
        axes[0].plot(
            steps,
            eps["grad_norm_per_step"],
            marker="s",
            ls="--",
            color=color,
            label=f"{mode}, {eps['neurons']}",
        )
        pairs = [f"{t}-{t + 1}" for t in range(1, len(eps["one_step"]["mean_abs"]) + 1)]
        axes[1].plot(pairs, eps["one_step"]["mean_abs"], marker="o", color=color, label=mode)
        axes[2].plot(
            pairs, eps["one_step"]["vanished_fraction"], marker="o", color=color, label=f"{mode}: eps = 0"
        )
        axes[2].plot(
            pairs, eps["one_step"]["in_window_fraction"], ls=":", color=color, label=f"{mode}: in the window"
        )
        reach = [row[-1] for row in eps["matrix"]["mean_abs"][:-1]]
        axes[3].plot(steps[:-1], reach, marker="o", color=color, label=mode)
    axes[0].set(title="gradient norm reaching each step", xlabel="time step", ylabel="|dL/dx_t|")
    axes[1].set(title="eps(t) = dH(t+1)/dH(t), mean |.|", xlabel="steps", ylabel="mean over layers")
    axes[2].set(title="eps(t) vanished vs in window", xlabel="steps", ylabel="fraction of neurons")
    axes[3].set(title="the last step's reach: |dH(T)/dH(t)|", xlabel="time step t", ylabel="mean over layers")
    for ax in (axes[0], axes[3]):
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_pm_surrogate_gradients(hist: dict, path: Path) -> None:
    """The paper's Fig. 3: histograms of the PM token LIF's surrogate gradients, clamp on and off."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    edges = hist["bin_edges"]
    b, a = hist["clamp"]
    for label in ("clamped", "unclamped"):
        name = f"clamp({b:g}, {a:g})" if label == "clamped" else "no clamp"
        ax.stairs(hist[label]["counts"], edges, label=f"{name}: mean {hist[label]['mean']:.3f}", lw=1.5)
    ax.set_yscale("log")
    ax.set(
        title=f"PM surrogate gradients ({hist['surrogate']}, alpha {hist['alpha']:g})",
        xlabel="sigma'(H - V_th)",
        ylabel="count",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
