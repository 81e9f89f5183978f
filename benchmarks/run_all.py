"""Run every benchmark for one device and regenerate benchmarks/results/README.md (``make bench``).

    python benchmarks/run_all.py [--device cpu|cuda] [--quick] [--threads N]

Each benchmark runs in its own process (clean allocator and compile caches); results land in
``benchmarks/results/<name>-<device>.json`` and the README there is rebuilt from all JSON files present.
On a 2-core CPU machine the full run takes 10-15 minutes (sae_recovery.py alone about 8); ``--quick`` is a
smoke run that saves nothing.
CPU timings assume an otherwise idle machine: with other processes competing for the cores, multi-threaded
(OpenMP) ops stall at their barriers and the medians can be off by orders of magnitude (``--threads 1`` is
much less sensitive). On a GPU machine, ``benchmarks/gpu_check.sh`` runs the CUDA tests and this.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, add_common_args, write_readme

HERE = Path(__file__).resolve().parent
BENCHMARKS = (
    "lif.py",
    "attention.py",
    "tdformer_train.py",
    "spiliformer_train.py",
    "similarity.py",
    "sae_train.py",
    "sae_recovery.py",
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    args = ap.parse_args(argv)
    failed = []
    for script in BENCHMARKS:
        cmd = [sys.executable, str(HERE / script), "--device", args.device]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        print(f"=== {script} --device {args.device}{' --quick' if args.quick else ''}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        print(f"=== {script}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(script)
    if not args.quick:
        n = len(list(RESULTS.glob("*.json")))
        print(f"results: {write_readme().relative_to(HERE.parent)} ({n} tables)")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
