"""Voxel-dictionary similarity throughput: spikecore's streaming top-1 vs the dense [U, V] way, same run.

    python benchmarks/similarity.py [--device cpu|cuda] [--quick] [--threads N]

The workload is the voxel dictionary's search (SAE-BrainMap step 4, independent argmax): ``L`` layers of
SAE activations ``[N images, U latents]`` against voxel responses ``[N, V]``; per layer the latent of
highest centred cosine (Pearson r) for every voxel, then per voxel the best layer. Two approaches, each
run in its own fresh process (this script with the hidden ``--worker`` flag) on the same inputs:

- ``ours``: ``spikecore.topk_similarity(k=1)`` per layer (chunks of 2048 x 2048 on the CPU, the Triton
  kernel on CUDA; ``sae_brainmap.alignment.top_matches`` is a validated front to it, not imported here
  because importing sae_brainmap costs ~10 s) and a running per-voxel max over layers: the loop of
  ``sae_brainmap.build_voxel_dictionary``, without its gathering of the matched activations (an ``[N, V]``
  output the dense way does not produce).
- ``dense``: the authors' approach written plainly: z-score, one dense ``[U, V]`` fp32 similarity matrix
  per layer by one matmul (``az.T @ bz / N``), argmax over latents, then the max over layers.

Both must pick the same (layer, latent) per voxel: ``agree`` is the fraction that do; ``agree_ties`` also
counts a different pick whose r is within 1e-5 of the other's (a tie up to fp32 rounding); ``max_dr`` is
the largest r difference where they agree.

Inputs (generated in each worker, deterministically from seed 0): per layer, latent u fires on a fraction
p_u of the images, p_u log-uniform in [0.002, 0.3] (``relu(g + ndtri(p_u))`` with g ~ N(0, 1), times a
log-normal scale per latent), 1% of latents dead (all zero); voxel responses = N(0, 1) noise plus, for 80%
of the voxels, a planted z-scored latent of a random layer at a target r uniform in [0.05, 0.75].

Measured: ``s`` = wall time of the whole search (one run on the CPU; best of 2 on CUDA), after a warm-up on
tiny inputs of the same shapes mod 16, so that no compilation or library loading is timed; ``GFLOP/s`` =
2 N U V L / s; ``of_matmul`` = that over the GFLOP/s of one large fp32 matmul measured in the same run
(2048^3 on the CPU, best of 5 calls; 8192^3 on CUDA, median; torch's default fp32 precision, i.e. no
TF32; ours' Triton kernel computes in IEEE fp32 too).

``peak_MiB`` = memory at the peak above what was resident once the inputs existed: the inputs, the
interpreter and the loaded libraries are not counted; everything the search allocates (z-scored copies,
[U, V] matrices, chunk tiles, column statistics, matmul packing buffers, results) is. CPU: the worker
warms up, builds the inputs, resets the kernel's peak-RSS mark to the current RSS (writes 5 to
``/proc/self/clear_refs``) and reads ``ru_maxrss`` (``getrusage(RUSAGE_SELF)``, = the RSS with the
inputs), runs the search and reads ``ru_maxrss`` again: the peak is the difference. (Where the reset is
refused, the RSS after the inputs comes from ``/proc/self/statm`` and the peak of building the inputs may
count too: ``hwm_reset`` false in the JSON.) ``peak_MiB`` comes from a second fresh worker that runs one
layer (the peak does not grow with the layers: each layer's buffers are freed before the next) with
``MALLOC_MMAP_THRESHOLD_=1048576``, so that glibc maps every buffer of 1 MiB or more on its own and
returns it when freed: the figure is then what the search holds at once, the same in every run.
``peak_timed_MiB`` is the same measurement in the timed worker under glibc's default dynamic threshold,
where freed buffers of up to 32 MiB stay in the heap for reuse (faster: no page faults): it adds heap
slack that varies from run to run (ours at N=1,000: 75-234 MiB in repeated runs while every tile was a
fresh allocation; 47 MiB since the tiles reuse their buffers). CUDA: the caching allocator's
``max_memory_allocated`` above ``memory_allocated`` after the inputs, in the timed worker.

Size: CUDA runs the full size (12 layers x N=9,000 images x U=12,288 latents x V=15,000 voxels). The CPU
(2 cores) runs full U and V with N=3,000 and 3 layers (1/12 of the full work), plus N=1,000 and 1 layer
to fit the memory's growth with N; the whole run (8 workers) takes 2 minutes on an idle machine. The
``est_full_*`` columns are extrapolations to the full size, not measurements: time x (12 / L) x
(9000 / N); peak memory a + b N fitted through the two measured sizes, evaluated at N=9,000;
``full_inputs_MiB`` = the full-size inputs (12 x 9000 x U + 9000 x V fp32), held by both. The dense way
needs one ``[U, V]`` fp32 matrix per layer in flight (U V 4 bytes = 703 MiB; twice that while ``/ N``
makes its copy).
"""

import argparse
import gc
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import add_common_args, apply_threads, save, sync, time_ms

FULL = {"layers": 12, "n": 9000, "u": 12288, "v": 15000}
TIE_TOL = 1e-5

LEGEND = (
    "Voxel dictionary search: per layer the top-1 latent (Pearson r) of every voxel, then the best layer. "
    "ours = spikecore.topk_similarity (k=1) per layer + running max, as build_voxel_dictionary does; "
    "dense = z-score, one [U, V] fp32 matrix per layer by matmul, argmax, max over layers (the authors' "
    "way). Each in a fresh process; s = wall time; of_matmul = GFLOP/s over a large fp32 matmul's, same run; "
    "peak_MiB = measured peak above the RSS (CPU; one layer, glibc mmap threshold fixed at 1 MiB) / CUDA "
    "allocation once the inputs exist, peak_timed_MiB = the same in the timed run (CPU, default glibc: "
    "with heap slack, varies run to run); x_dense_* = "
    "dense / ours; agree = same (layer, latent) per voxel, agree_ties also counting picks within 1e-5 in r; "
    "est_full_* = extrapolated to 12 layers x N=9,000 (time linear in L and N; memory linear fit in N "
    "through the two sizes), full_inputs_MiB = the inputs at that size. Synthetic sparse activations with "
    "planted voxels (see the script's docstring)."
)


# ------------------------------------------------------------------------------------------- workload
def make_inputs(n: int, u: int, v: int, layers: int, device: str, seed: int = 0):
    """``([acts [n, u]] * layers, responses [n, v])``, fp32, built in place or in voxel chunks so that
    building them allocates little beyond the result."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=g, device=device)

    acts = []
    for _ in range(layers):
        p = torch.exp(math.log(0.002) + rand(u) * math.log(0.3 / 0.002))  # firing rate per latent
        scale = torch.exp(0.5 * torch.randn(u, generator=g, device=device)) * (rand(u) >= 0.01)  # 1% dead
        a = torch.randn(n, u, generator=g, device=device)
        acts.append(a.add_(torch.special.ndtri(p)).relu_().mul_(scale))
    src_layer = torch.randint(layers, (v,), generator=g, device=device)
    src_latent = torch.randint(u, (v,), generator=g, device=device)
    r = 0.05 + 0.7 * rand(v)
    w = r / (1 - r**2).sqrt() * (rand(v) < 0.8)  # b = w z + noise has r = w / sqrt(w^2 + 1) with z
    b = torch.randn(n, v, generator=g, device=device)
    for v0 in range(0, v, 1024):
        for lay in range(layers):
            sel = v0 + (src_layer[v0 : v0 + 1024] == lay).nonzero()[:, 0]
            cols = acts[lay][:, src_latent[sel]]
            z = (cols - cols.mean(0)) / cols.std(0).clamp_min(1e-12)  # dead latent: 0
            b.index_add_(1, sel, z * w[sel])
    return acts, b


def ours_dictionary(acts, responses):
    """Per voxel ``(layer, latent, r)``: the top-1 latent of each layer by ``spikecore.topk_similarity``
    (what ``sae_brainmap.alignment.top_matches`` calls after its argument checks) and a running max over
    layers, the loop of ``sae_brainmap.build_voxel_dictionary`` (a tie keeps the earlier layer)."""
    import spikecore

    V = responses.shape[1]
    best_r = torch.full((V,), float("-inf"), device=responses.device)
    best_layer = torch.full((V,), -1, dtype=torch.int64, device=responses.device)
    best_latent = torch.full((V,), -1, dtype=torch.int64, device=responses.device)
    with torch.no_grad():
        for lay, a in enumerate(acts):
            vals, idx = spikecore.topk_similarity(a, responses, k=1, centered=True)
            vals, idx = vals[:, 0], idx[:, 0]
            better = (idx >= 0) & (vals > best_r)
            best_r = torch.where(better, vals, best_r)
            best_layer = torch.where(better, lay, best_layer)
            best_latent = torch.where(better, idx, best_latent)
    return best_layer, best_latent, best_r


def dense_dictionary(acts, responses):
    """The authors' approach, written plainly: z-score, the whole ``[U, V]`` r matrix of each layer,
    argmax over latents; then the best layer per voxel."""
    n = responses.shape[0]
    bz = (responses - responses.mean(0)) / responses.std(0, unbiased=False)
    rs, us = [], []
    for a in acts:
        az = (a - a.mean(0)) / a.std(0, unbiased=False).clamp_min(1e-8)  # a dead latent: 0, not NaN
        s = az.T @ bz / n  # [U, V] Pearson r
        r, u = s.max(dim=0)
        rs.append(r)
        us.append(u)
        del az, s
    r, layer = torch.stack(rs).max(dim=0)
    return layer, torch.stack(us).gather(0, layer[None])[0], r


APPROACHES = {"ours": ours_dictionary, "dense": dense_dictionary}


# --------------------------------------------------------------------------------------------- worker
def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (what ru_maxrss reports) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _Peak:
    """Memory above the level at construction: CUDA allocations, or the RSS (see the module docstring)."""

    def __init__(self, device: str):
        gc.collect()
        sync(device)
        self.device = device
        if device == "cuda":
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.hwm_reset = True
        else:
            self.hwm_reset = _reset_hwm()  # then ru_maxrss reads the current RSS, as the kernel counts it
            self.base = _maxrss_bytes() if self.hwm_reset else _rss_bytes()

    def bytes(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return _maxrss_bytes() - self.base


def worker(approach: str, layers: int, n: int, u: int, v: int, device: str, out: str) -> None:
    """Warm up, build the inputs, time the search (best of 2 on CUDA) and measure its peak memory; save
    results and figures to ``out``."""
    fn = APPROACHES[approach]
    warm = make_inputs(128 + n % 16, 256 + u % 16, 192 + v % 16, 2, device, seed=1)  # same shapes mod 16
    fn(*warm)
    del warm
    acts, b = make_inputs(n, u, v, layers, device)
    mem = _Peak(device)
    times = []
    for _ in range(2 if device == "cuda" else 1):
        start = time.perf_counter()
        res = fn(acts, b)
        sync(device)
        times.append(time.perf_counter() - start)
    figures = {"s": min(times), "peak_bytes": mem.bytes(), "hwm_reset": mem.hwm_reset}
    figures["inputs_bytes"] = sum(t.nbytes for t in acts) + b.nbytes
    layer, latent, r = (t.cpu() for t in res)
    torch.save({**figures, "layer": layer, "latent": latent, "r": r}, out)


def _run(approach: str, size: dict, args, env=None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.pt"
        cmd = [sys.executable, __file__, "--device", args.device, "--worker", approach, "--out", str(out)]
        cmd += ["--size", ",".join(str(size[k]) for k in ("layers", "n", "u", "v"))]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        subprocess.run(cmd, check=True, env=env)
        return torch.load(out, weights_only=True)


def run_worker(approach: str, size: dict, args) -> dict:
    """Time and memory of one approach at one size, each worker a fresh process. On the CPU the memory
    comes from a second worker, one layer, with glibc's mmap threshold fixed at 1 MiB (see the module
    docstring); ``peak_timed_bytes`` is the timed worker's."""
    res = _run(approach, size, args)
    res["peak_timed_bytes"] = res["peak_bytes"]
    if args.device == "cpu":
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
        mem = _run(approach, {**size, "layers": 1}, args, env=env)
        res["peak_bytes"], res["hwm_reset"] = mem["peak_bytes"], res["hwm_reset"] and mem["hwm_reset"]
    peaks = f"{res['peak_bytes'] / 2**20:.1f} MiB ({res['peak_timed_bytes'] / 2**20:.1f} in the timed run)"
    print(f"  {approach} {size}: {res['s']:.2f} s, peak {peaks}", flush=True)
    return res


def agreement(a: dict, b: dict) -> dict:
    same = (a["layer"] == b["layer"]) & (a["latent"] == b["latent"])
    ties = same | ((a["r"] - b["r"]).abs() <= TIE_TOL)
    dr = (a["r"] - b["r"]).abs()[same]
    return {
        "agree": same.float().mean().item(),
        "agree_ties": ties.float().mean().item(),
        "max_dr": dr.max().item() if dr.numel() else None,
    }


def matmul_gflops(device: str, quick: bool) -> tuple[int, float]:
    """GFLOP/s of a square fp32 matmul: median of do_bench on CUDA; on the CPU the best of 5 calls after a
    warm-up (the best, not the median, so that other processes' load lowers it less)."""
    m = 512 if quick else 8192 if device == "cuda" else 2048
    x = torch.randn(m, m, device=device)
    if device == "cuda":
        ms = time_ms(lambda: x @ x, device)
    else:
        x @ x
        times = []
        for _ in range(5):
            start = time.perf_counter()
            x @ x
            times.append((time.perf_counter() - start) * 1e3)
        ms = min(times)
    return m, 2 * m**3 / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--worker", choices=tuple(APPROACHES), help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)  # layers,n,u,v
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    apply_threads(args)
    dev = args.device
    if args.worker:
        layers, n, u, v = (int(s) for s in args.size.split(","))
        return worker(args.worker, layers, n, u, v, dev, args.out)

    if args.quick:
        sizes = [{"layers": 1, "n": 48, "u": 512, "v": 300}, {"layers": 2, "n": 96, "u": 512, "v": 300}]
    elif dev == "cuda":
        sizes = [FULL]
    else:  # N=1,000 x 1 layer only for the memory fit
        sizes = [{**FULL, "layers": 1, "n": 1000}, {**FULL, "layers": 3, "n": 3000}]
    load0 = os.getloadavg()[0]
    mm_size, mm_gflops = matmul_gflops(dev, args.quick)
    print(f"fp32 matmul {mm_size}^3: {mm_gflops:.1f} GFLOP/s", flush=True)
    runs = [{name: run_worker(name, size, args) for name in APPROACHES} for size in sizes]

    rows = []
    for size, res in zip(sizes, runs, strict=True):
        agree = agreement(res["ours"], res["dense"])
        o, d = res["ours"], res["dense"]
        for name, r in res.items():
            gflops = 2 * size["n"] * size["u"] * size["v"] * size["layers"] / r["s"] / 1e9
            rows.append(
                {
                    "approach": name,
                    "layers": size["layers"],
                    "N": size["n"],
                    "U": size["u"],
                    "V": size["v"],
                    "s": r["s"],
                    "GFLOP/s": gflops,
                    "of_matmul": gflops / mm_gflops,
                    "peak_MiB": r["peak_bytes"] / 2**20,
                    "peak_timed_MiB": r["peak_timed_bytes"] / 2**20 if dev == "cpu" else None,
                    "inputs_MiB": r["inputs_bytes"] / 2**20,
                    "x_dense_s": d["s"] / o["s"] if name == "ours" else None,
                    "x_dense_mem": d["peak_bytes"] / o["peak_bytes"]
                    if name == "ours" and o["peak_bytes"] > 0
                    else None,
                    **agree,
                }
            )
    if len(sizes) == 2:  # CPU: extrapolate the larger size to the full one
        (s1, s2), nf = sizes, FULL["n"]
        for i, name in enumerate(APPROACHES):
            m1, m2 = runs[0][name]["peak_bytes"], runs[1][name]["peak_bytes"]
            slope = max((m2 - m1) / (s2["n"] - s1["n"]), 0.0)
            row = rows[len(APPROACHES) + i]
            row["est_full_s"] = row["s"] * (FULL["layers"] / s2["layers"]) * (nf / s2["n"])
            row["est_full_peak_MiB"] = (m2 + slope * (nf - s2["n"])) / 2**20
            inputs = FULL["layers"] * nf * s2["u"] + nf * s2["v"]
            row["full_inputs_MiB"] = inputs * 4 / 2**20
    hwm = all(r["hwm_reset"] for res in runs for r in res.values())
    load = [round(load0, 2), round(os.getloadavg()[0], 2)]
    note = f"fp32 matmul {mm_size}^3 {mm_gflops:.1f} GFLOP/s, load average {load[0]} -> {load[1]}"
    extra = {"note": note + ("" if hwm else "; no HWM reset"), "loadavg_1min": load}
    extra |= {
        "matmul_gflops": mm_gflops,
        "hwm_reset": hwm,
        "float32_matmul": torch.get_float32_matmul_precision(),
    }
    save("similarity", dev, rows, write=not args.quick, legend=LEGEND, **extra)


if __name__ == "__main__":
    main()
