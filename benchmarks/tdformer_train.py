"""TDFormer training throughput: forward + backward images/s, ours vs spikingjelly's Spikformer.

    python benchmarks/tdformer_train.py [--device cpu|cuda] [--quick]

All in one run, batch 8 of 32x32 CIFAR images, T=4, 10 classes, training mode (BatchNorm batch stats),
one optimizer-free step = forward, cross-entropy, backward to every parameter:
- ``spikformer_4_384``: tdformer's baseline (spikecore's Spikformer, fused LIF);
- ``tdformer_spikformer_4_384``: the same backbone with top-down feedback (2 segments of 2 steps, CM1, PM v1);
- ``sj spikformer_cifar10``: spikingjelly 2.0's reference model (its LIF nodes; cupy/triton on CUDA when it
  has them, torch on CPU), reset between batches as it requires.
Columns: ``img_per_s`` (batch / median step time), ``x_sj`` = our img/s over spikingjelly's,
``params_M``, ``feedback_overhead`` = baseline img/s over the feedback model's.
"""

import argparse

import torch
import torch.nn.functional as F
from _common import add_common_args, apply_threads, save, time_many

LEGEND = (
    "forward + cross-entropy + backward, training mode, batch 8 of 32x32 images, T=4; img_per_s = batch / "
    "median step time; x_sj = img/s over spikingjelly's spikformer_cifar10; feedback_overhead = baseline "
    "img/s / feedback img/s."
)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    args = ap.parse_args(argv)
    apply_threads(args)
    dev = args.device
    torch.manual_seed(0)
    batch = 2 if args.quick else 8
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.model.spikformer import spikformer_cifar10

    import tdformer

    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    models = {
        "spikformer_4_384": tdformer.create_model("spikformer_4_384").to(dev).train(),
        "tdformer_spikformer_4_384": tdformer.create_model("tdformer_spikformer_4_384").to(dev).train(),
        "sj spikformer_cifar10": spikformer_cifar10(T=4, num_classes=10).to(dev).train(),
    }

    def step(name, model):
        def run():
            if name.startswith("sj"):
                functional.reset_net(model)
            out = model(x)
            if out.dim() == 3:  # spikingjelly returns [T, B, K] for some configs: the paper's mean over T
                out = out.mean(0)
            F.cross_entropy(out, y).backward()
            model.zero_grad(set_to_none=True)

        return run

    times = time_many({n: step(n, m) for n, m in models.items()}, dev, rounds=1 if args.quick else 3)
    sj_ips = batch / (times["sj spikformer_cifar10"] * 1e-3) if times["sj spikformer_cifar10"] else None
    base_ips = batch / (times["spikformer_4_384"] * 1e-3) if times["spikformer_4_384"] else None
    rows = []
    for name, model in models.items():
        ms = times[name]
        ips = batch / (ms * 1e-3) if ms else None
        rows.append(
            {
                "model": name,
                "batch": batch,
                "T": 4,
                "step_ms": ms,
                "img_per_s": ips,
                "x_sj": ips / sj_ips if ips and sj_ips else None,
                "feedback_overhead": base_ips / ips
                if name.startswith("tdformer") and ips and base_ips
                else None,
                "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            }
        )
    save("tdformer-train", dev, rows, write=not args.quick, legend=LEGEND)


if __name__ == "__main__":
    main()
