"""Parameter and operation counts of the full-size architectures against the numbers the papers publish.

    python benchmarks/energy_vs_papers.py [--no-flops]

Counts need no training: each model is built at its paper size with random weights and run once on one
random input (batch 1, the paper's T) under ``spikecore.energy.estimate``. ``dense GMACs`` is every
counted op at full density for one sample over all T steps: what the papers call "GFLOPs" (TDFormer,
appendix C.1: FLOPs "is the number of MAC operations"); torch's FLOPs are twice that. Energy is left out:
it depends on the firing rates of trained weights (``tdformer analyze`` / ``spiliformer analyze`` report
it for a checkpoint). Not part of ``make bench`` (nothing is timed); takes about a minute on 2 CPU cores.
"""

import argparse
import sys

import torch

from spikecore.energy import estimate
from spikecore.models import create_model as spikecore_model
from spiliformer.registry import create_model as spiliformer_model
from tdformer.registry import create_model as tdformer_model

CIFAR = (1, 3, 32, 32)
SDT_CIFAR = dict(img_size=32, in_chans=3, num_classes=10, T=4, pooling_stat="0011")

# (label, builder, input shape or None for parameters only, paper GFLOPs, paper params in M, source)
CASES = [
    (
        "Spikformer-4-384, CIFAR-10, T=4",
        lambda: spikecore_model("spikformer_4_384"),
        CIFAR,
        3.71,
        9.33,
        "TDFormer T6",
    ),
    (
        "TDFormer CM1+V1 on it (2 segments)",
        lambda: tdformer_model("tdformer_spikformer_4_384", control="cm1"),
        CIFAR,
        3.88,
        9.92,
        "TDFormer T6",
    ),
    (
        "the same with a dense PM channel mixer",
        lambda: tdformer_model("tdformer_spikformer_4_384", pm_channel_mixer="dense"),
        CIFAR,
        3.88,
        9.92,
        "TDFormer T6",
    ),
    (
        "TDFormer CM3+V1 on it",
        lambda: tdformer_model("tdformer_spikformer_4_384", control="cm3"),
        CIFAR,
        3.90,
        9.92,
        "TDFormer T6",
    ),
    (
        "SDT-2-256, CIFAR-10, T=4",
        lambda: spikecore_model("sdt_2_256", **SDT_CIFAR),
        CIFAR,
        1.25,
        2.57,
        "TDFormer T6",
    ),
    (
        "TDFormer CM1+V1 on it",
        lambda: tdformer_model("tdformer_sdt_2_256", **SDT_CIFAR),
        CIFAR,
        1.31,
        2.69,
        "TDFormer T6",
    ),
    (
        "QKFormer HST-4-384, CIFAR-10",
        lambda: spikecore_model("qkformer_hst_4_384"),
        CIFAR,
        None,
        6.74,
        "QKFormer",
    ),
    (
        "SpiLiFormer-4-384, CIFAR-10",
        lambda: spiliformer_model("spiliformer_4_384"),
        CIFAR,
        None,
        7.04,
        "SpiLiFormer",
    ),
    (
        "QKFormer HST-2-256, CIFAR10-DVS",
        lambda: spikecore_model("qkformer_hst_2_256"),
        None,
        None,
        1.50,
        "QKFormer",
    ),
    (
        "SpiLiFormer-2-256, CIFAR10-DVS code",
        lambda: spiliformer_model("spiliformer_2_256_dvs", kv_diff=True, decoder_bn=False),
        None,
        None,
        1.57,
        "SpiLiFormer (code: 1.702M)",
    ),
    (
        "QKFormer HST-10-768, ImageNet",
        lambda: spikecore_model("qkformer_hst_10_768"),
        None,
        None,
        64.96,
        "QKFormer",
    ),
    (
        "TDFormer on it, feedback into 1 block",
        lambda: tdformer_model("tdformer_qkformer_hst_10_768", feedback_blocks=[-1]),
        None,
        None,
        65.55,
        "TDFormer",
    ),
    (
        "TDFormer on it, feedback into 7 blocks",
        lambda: tdformer_model("tdformer_qkformer_hst_10_768"),
        None,
        None,
        69.09,
        "TDFormer",
    ),
    (
        "SpiLiFormer-10-768, ImageNet",
        lambda: spiliformer_model("spiliformer_10_768"),
        None,
        None,
        69.10,
        "SpiLiFormer",
    ),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-flops", action="store_true", help="parameters only (no forward pass)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print('| model | params (M) ours / paper | dense GMACs ours / paper ("GFLOPs") | source |')
    print("|---|---|---|---|")
    for label, build, shape, paper_g, paper_p, source in CASES:
        model = build()
        params = sum(p.numel() for p in model.parameters())
        flops = "-"
        if shape is not None and not args.no_flops:
            r = estimate(model, torch.rand(shape))
            assert r.params == params
            flops = f"{r.dense_macs / 1e9:.3f} / " + (f"{paper_g:.2f}" if paper_g is not None else "-")
        print(f"| {label} | {params / 1e6:.3f} / {paper_p:.2f} | {flops} | {source} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
