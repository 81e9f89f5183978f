"""SpiLiFormer training throughput: forward + backward images/s, ours vs spikingjelly's QKFormer.

    python benchmarks/spiliformer_train.py [--device cpu|cuda] [--quick]

All in one run, batch 8 of 32x32 CIFAR images, T=4, 10 classes, training mode, one optimizer-free step =
forward, loss, backward to every parameter:
- ``qkformer_hst_4_384``: spiliformer's baseline (spikecore's QKFormer, CIFAR stem, fused LIF);
- ``spiliformer_4_384``: FF-LiDiff / FB-LiDiff with the feedback generator and its two passes, loss
  (1 - beta) CE1 + beta CE2 (the training step of the package);
- ``qkformer (sj layout)``: spikecore's QKFormer built exactly like spikingjelly's reference (its ImageNet
  stem, 8 heads, depths 1-1-2 at D=384), and ``sj QKFormer``: spikingjelly 2.0's model with the same
  arguments, reset between batches: the like-for-like pair behind ``x_sj``.
Columns: ``img_per_s`` (batch / median step time), ``x_sj`` = img/s over spikingjelly's QKFormer (for the
like-for-like row), ``two_pass_overhead`` = baseline img/s over SpiLiFormer's, ``params_M``.
"""

import argparse

import torch
import torch.nn.functional as F
from _common import add_common_args, apply_threads, save, time_many

LEGEND = (
    "forward + loss + backward, training mode, batch 8 of 32x32 images, T=4; img_per_s = batch / median step "
    "time; x_sj = img/s of spikecore's QKFormer in spikingjelly's layout over spikingjelly's QKFormer; "
    "two_pass_overhead = qkformer_hst_4_384 img/s / spiliformer_4_384 img/s."
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
    from spikingjelly.activation_based.model.qkformer import QKFormer as SJQKFormer

    import spiliformer
    from spikecore.models.qkformer import QKFormer
    from spiliformer.module import SpiLiFormerClassifier

    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    sj_layout = dict(T=4, num_classes=10, embed_dims=384, num_heads=(8, 8, 8), depths=(1, 1, 2))
    ours_sj_layout = dict(
        img_size=32, embed_dims=(96, 192, 384), depths=(1, 1, 2), num_heads=8, stem="imagenet", T=4
    )
    spili = SpiLiFormerClassifier(arch="spiliformer_4_384", num_classes=10, T=4).to(dev).train()
    models = {
        "qkformer_hst_4_384": spiliformer.create_model("qkformer_hst_4_384").to(dev).train(),
        "spiliformer_4_384": spili,
        "qkformer (sj layout)": QKFormer(num_classes=10, **ours_sj_layout).to(dev).train(),
        "sj QKFormer": SJQKFormer(**sj_layout).to(dev).train(),
    }

    def step(name, model):
        def run():
            if name.startswith("sj"):
                functional.reset_net(model)
            if model is spili:  # the package's two-pass training loss
                loss = model.training_loss(x, y)[0]
            else:
                out = model(x)
                loss = F.cross_entropy(out.mean(0) if out.dim() == 3 else out, y)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    times = time_many({n: step(n, m) for n, m in models.items()}, dev, rounds=1 if args.quick else 3)

    def ips(name):
        return batch / (times[name] * 1e-3) if times[name] else None

    rows = []
    for name, model in models.items():
        rows.append(
            {
                "model": name,
                "batch": batch,
                "T": 4,
                "step_ms": times[name],
                "img_per_s": ips(name),
                "x_sj": ips(name) / ips("sj QKFormer")
                if name == "qkformer (sj layout)" and ips(name) and ips("sj QKFormer")
                else None,
                "two_pass_overhead": ips("qkformer_hst_4_384") / ips(name)
                if name == "spiliformer_4_384" and ips(name) and ips("qkformer_hst_4_384")
                else None,
                "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            }
        )
    save("spiliformer-train", dev, rows, write=not args.quick, legend=LEGEND)


if __name__ == "__main__":
    main()
