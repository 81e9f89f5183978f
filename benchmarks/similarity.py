"""Streaming top-k similarity (SAE latents x voxels): spikecore vs the full-matrix way, same run.

    python benchmarks/similarity.py [--device cpu|cuda] [--quick]

Per shape (N samples, U columns of A, V columns of B, k): ``ours`` = ``spikecore.topk_similarity`` (chunked
PyTorch on CPU, the Triton kernel on CUDA); ``full`` = what one writes without it: z-score both inputs,
``A_z^T B_z / N`` as one ``[U, V]`` matrix, ``torch.topk`` over U. Columns: median ms, ``x_full`` (full's
time / ours), ``GFLOP/s`` of ours (2 N U V / time), and the extra memory each holds: the ``[U, V]`` matrix
for ``full``, the chunk tiles for ours (computed from the shapes, not measured).
"""

import argparse

import torch
from _common import add_common_args, apply_threads, save, time_many

import spikecore

LEGEND = (
    "ours = spikecore.topk_similarity (Pearson r, chunk 2048 on CPU / Triton kernel on CUDA); "
    "full = z-score, one [U, V] matmul, torch.topk; x_full = full ms / ours ms; "
    "extra_MiB = the [U, V] matrix (full) or the chunk tiles (ours), from the shapes."
)


def full_way(a, b, k):
    az = (a - a.mean(0)) / a.std(0, unbiased=False)
    bz = (b - b.mean(0)) / b.std(0, unbiased=False)
    return torch.topk(az.T @ bz / a.shape[0], k, dim=0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    args = ap.parse_args(argv)
    apply_threads(args)
    dev = args.device
    torch.manual_seed(0)
    shapes = [(64, 512, 256, 1)] if args.quick else [(1000, 12288, 2000, 1), (1000, 12288, 2000, 5)]
    rows = []
    for n, u, v, k in shapes:
        a = torch.randn(n, u, device=dev).relu()  # SAE-like: non-negative, sparse
        b = torch.randn(n, v, device=dev)
        fns = {
            "ours": lambda a=a, b=b, k=k: spikecore.topk_similarity(a, b, k=k),
            "full": lambda a=a, b=b, k=k: full_way(a, b, k),
        }
        times = time_many(
            fns,
            dev,
            rounds=1 if args.quick else 3,
        )
        chunk = 2048
        ours_mib = (chunk * chunk + 2 * n * chunk) * 4 / 2**20 if dev == "cpu" else (u + v) * 16 / 2**20
        rows.append(
            {
                "N": n,
                "U": u,
                "V": v,
                "k": k,
                "ours_ms": times["ours"],
                "full_ms": times["full"],
                "x_full": times["full"] / times["ours"] if times["ours"] and times["full"] else None,
                "GFLOP/s": 2 * n * u * v / (times["ours"] * 1e-3) / 1e9 if times["ours"] else None,
                "extra_MiB_full": u * v * 4 / 2**20,
                "extra_MiB_ours": ours_mib,
            }
        )
    save("similarity", dev, rows, write=not args.quick, legend=LEGEND)


if __name__ == "__main__":
    main()
