"""Multi-step LIF, forward and forward+backward: spikecore's fused kernel vs spikingjelly vs the eager loop.

    python benchmarks/lif.py [--device cpu|cuda] [--quick]

Per config (T steps, N neurons, dtype), all in one run:
- ``ours``: ``spikecore.lif_multi_step(x, tau=2.0, detach_reset=True, backend="cpu"|"triton")``;
- ``sj``: spikingjelly 2.0's ``neuron.LIFNode(tau=2.0, step_mode='m', detach_reset=True)`` (reset before
  every call) for float32 input. For fp16/bf16 input the node would keep an fp16 state and fall back to its
  Python loop, so there the row uses the op the node calls, ``functional.neuron.lif_multi_step``, with an
  fp32 initial membrane. On CPU that is its torch implementation; on CUDA its automatic choice, the first
  that loads of native CUDA, Triton, torch (``SJ_LIF_CUDA_IMPLEMENTATION`` overrides; the ``sj_impl``
  column says which ran);
- ``eager``: ``spikecore.lif_multi_step(..., backend="torch")``, the plain PyTorch loop;
- ``ours_avx2`` (CPU, on an x86-64 CPU with AVX-512): ``ours`` with the C++ kernels built for AVX2 only
  (``SPIKECORE_CPU_ISA=avx2``: ``-march=native -mno-avx512f``), what an AVX2-only machine runs; ``ours_sse4``
  (x86-64 with AVX2): built for x86-64-v2 (128-bit SSE vectors, no FMA, no F16C: the generic code of a NEON
  build, and what a pre-2013 x86-64 runs); ``ours_numba``: the numba kernels, the fallback where no C++
  compiler is at hand (``SPIKECORE_CPU_KERNELS=numba``). ``x_sj_<name>``: their speed-up over sj. The
  machine line states the CPU's widest vector ISA, which ``ours`` is built for.

Columns: ``pass`` fwd (under no_grad) or fwd+bwd; ``*_ms`` median times; ``x_sj`` / ``x_eager`` our speed-up
(their time / ours); ``floor_ms``: bytes the op must move (forward reads x and writes s; backward reads
grad s, re-reads x and writes grad x) over ``copy_bw_gbs``, the bandwidth of a copy that moves as many bytes
(so through the same cache level: where the L3 holds the op, the floor is the L3's), timed in the same
interleaved rounds as the contenders (so that a slow phase of a shared machine slows it too); ``ours/floor``;
the machine line's ``copy_bw_gbs`` is a 512 MB copy's (DRAM on most CPUs); ``saved_B_*``: bytes kept
for backward per neuron-step, measured with saved_tensors_hooks; ``peak_MiB_*`` (CUDA): peak memory of one
forward+backward above the inputs; ``faults_*`` (CPU): minor page faults per forward+backward. glibc's malloc
maps every allocation of 32 MiB or more afresh (its mmap threshold stops growing there), so from T = 8 at
2^20 fp32 neurons each new output is faulted in page by page, for every contender alike; see the README's
note on allocators.

On CPU a second table repeats the fp32 forward+backward rows (ours and sj only) in a fresh process whose glibc
keeps freed memory (``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` at 4 GiB, the README's
allocator advice, for both alike): no output is faulted in afresh there, so it shows the ops without the
machine's cost of fresh memory, which on a VM (freed pages handed back to the host) can exceed the kernels'
time several times over from T = 8 on.

A third table times the kernels alone: one thread, 65,536 neuron-steps in cache, ns per
neuron-step of the C++ kernels' forward and backward ops for each ISA build (``kernel_rows``). It moves by
a few percent between runs where the 2^20-neuron rows move by 20-30% with the bandwidth a shared VM gets.
"""

import argparse
import contextlib
import functools
import json
import os
import resource
import subprocess
import sys
import time

import torch
from _common import (
    add_common_args,
    apply_threads,
    copy_bandwidth_gbs,
    copy_fn,
    cuda_peak_bytes,
    save,
    saved_bytes,
    sync,
    time_many,
)

import spikecore
from spikecore.neuron import _cpu_cpp

LEGEND = (
    "ours = spikecore fused kernel, sj = spikingjelly 2.0 LIFNode (fp32; its lif_multi_step op for "
    "fp16/bf16), eager = PyTorch loop; "
    "ours_avx2 = ours built for AVX2 only (on an AVX-512 CPU); ours_sse4 = built for x86-64-v2 (128-bit, the "
    "generic code NEON runs); ours_numba = the numba fallback; "
    "x_sj / x_eager = their ms / our ms; x_sj_<name> = sj ms / ours_<name> ms; "
    "floor = bytes moved (fwd: x, s; bwd: grad s, x, grad x) / copy_bw_gbs, a copy of as many bytes timed in "
    "the same rounds; "
    "saved_B = bytes saved for backward per neuron-step (saved_tensors_hooks); peak = CUDA peak "
    "MiB of one fwd+bwd; faults = minor page faults per fwd+bwd (CPU; allocations of 32 MiB and more are "
    "mapped afresh by glibc on every call)."
)


KEEP_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
KEEP_MEMORY_TABLE = (
    "fp32 forward+backward, 2^20 neurons, in a fresh process whose glibc keeps freed memory "
    "(MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ = 4 GiB, for every contender alike): no fresh pages"
)
_KEEP_MEMORY_COLS = ("T", "ours_ms", "sj_ms", "x_sj", "floor_ms", "ours/floor", "faults_ours", "faults_sj")


def keep_memory_rows(Ts, n: int, threads: int | None) -> list[dict]:
    """The fp32 fwd+bwd rows of ``Ts`` for ours and sj, timed in a fresh process with ``KEEP_MEMORY_ENV``
    (glibc reads it at start-up only, so it takes a process of its own)."""
    cmd = [sys.executable, __file__, "--keep-memory-worker", ",".join(map(str, Ts)), "--n", str(n)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(
        cmd, env={**os.environ, **KEEP_MEMORY_ENV}, capture_output=True, text=True, timeout=1800
    )
    if out.returncode != 0:
        print(f"  keep-memory worker failed: {out.stderr.strip().splitlines()[-1:]}")
        return []
    return json.loads(out.stdout.strip().splitlines()[-1])


def _keep_memory_worker(Ts, n: int) -> None:
    fns = {k: v for k, v in impls("cpu", "cpu").items() if k in ("ours", "sj")}
    first_call(fns["ours"], "cpu")
    rows = []
    for T in Ts:
        (row,) = bench_config(fns, T, n, torch.float32, "cpu", passes=("fwd+bwd",))
        rows.append({k: row.get(k) for k in _KEEP_MEMORY_COLS})
    print(json.dumps(rows))


KERNEL_TABLE = (
    "In-cache C++ kernels, 1 thread, ns per neuron-step (T x N = 65,536; sigmoid surrogate, tau 2, detached "
    "reset), per ISA build (native, avx2, sse4 as above), min over {reps} interleaved rounds"
)


def impls(device: str, ours_backend: str) -> dict:
    from spikingjelly.activation_based import functional, neuron, surrogate
    from spikingjelly.activation_based.functional.neuron import lif_multi_step as sj_lif

    sg = surrogate.Sigmoid()
    node = neuron.LIFNode(tau=2.0, step_mode="m", detach_reset=True, surrogate_function=sg).to(device)

    def ours(x):
        return spikecore.lif_multi_step(x, tau=2.0, detach_reset=True, backend=ours_backend)[0]

    def eager(x):
        return spikecore.lif_multi_step(x, tau=2.0, detach_reset=True, backend="torch")[0]

    def sj(x):
        if x.dtype == torch.float32:
            functional.reset_net(node)
            return node(x)
        v0 = torch.zeros(x.shape[1:], dtype=torch.float32, device=x.device)
        return sj_lif(x, v0, 2.0, True, 1.0, 0.0, sg, True)[0]

    fns = {"ours": ours, "sj": sj, "eager": eager}
    if device == "cpu":
        fns.update({name: ours for name in CONTENDER_ENV})
    return fns


def _cpu_contender_env() -> dict:
    """Environment of each extra CPU contender: the other ISA builds that run here, and numba."""
    env = {f"ours_{isa}": {"SPIKECORE_CPU_ISA": isa} for isa in _cpu_cpp.available_isas() if isa != "native"}
    env["ours_numba"] = {"SPIKECORE_CPU_KERNELS": "numba"}
    return env


CONTENDER_ENV = _cpu_contender_env()


@contextlib.contextmanager
def contender_env(name: str):
    """The environment of contender ``name`` (``ours_avx2``: SPIKECORE_CPU_ISA=avx2, ...) over one call."""
    env = CONTENDER_ENV.get(name, {})
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sj_impl_name(device: str) -> str:
    if device == "cpu":
        return "torch"
    try:
        from spikingjelly._ops.lif import _selection

        return _selection.diagnostics(torch.device("cuda"))["implementation"]
    except Exception as e:  # private API: report rather than fail
        return f"? ({type(e).__name__})"


def first_call(fn, device: str) -> float:
    """Seconds of the first forward+backward in this process: JIT compilation or cache loading included."""
    x = torch.randn(4, 1000, device=device, requires_grad=True)
    start = time.perf_counter()
    fn(x).sum().backward()
    sync(device)
    return time.perf_counter() - start


def page_faults_per_call(fn, calls: int = 5) -> float:
    """Minor page faults of this process per call of ``fn()`` (after one warm-up call)."""
    fn()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / calls


def bench_config(
    fns: dict, T: int, N: int, dtype: torch.dtype, device: str, passes=("fwd", "fwd+bwd")
) -> list[dict]:
    """One row per pass in ``passes`` (``fwd``, ``fwd+bwd``), in that order."""
    x = (torch.randn(T, N, device=device) * 1.5 + 1.0).to(dtype)  # fresh input, a real firing rate
    g = torch.randn(T, N, device=device).to(dtype)
    xg = x.clone().requires_grad_()
    esize = x.element_size()
    floor_bytes = {p: T * N * esize * {"fwd": 2, "fwd+bwd": 5}[p] for p in passes}
    rows = {p: {"T": T, "N": N, "dtype": str(dtype).removeprefix("torch."), "pass": p} for p in passes}
    floor_ms = {}

    def fwd(fn, name=""):
        with torch.no_grad(), contender_env(name):
            fn(x)

    def fwd_bwd(fn, name=""):
        with contender_env(name):
            xg.grad = None
            fn(xg).backward(g)

    for p, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        if p not in rows:
            continue
        # The floor: a copy moving the same bytes (half read, half written), so through the same cache level,
        # timed in the same interleaved rounds as the contenders: a slow phase of a shared machine slows both.
        contenders = {name: functools.partial(step, fn, name) for name, fn in fns.items()}
        times = time_many({**contenders, "copy": copy_fn(device, floor_bytes[p] // 2)}, device)
        floor_ms[p] = times.pop("copy")
        rows[p].update({f"{name}_ms": ms for name, ms in times.items()})
        rows[p]["copy_bw_gbs"] = floor_bytes[p] / (floor_ms[p] * 1e-3) / 1e9
    for name, fn in fns.items():
        if "fwd+bwd" not in rows or rows["fwd+bwd"][f"{name}_ms"] is None:
            continue
        rows["fwd+bwd"][f"saved_B_{name}"] = saved_bytes(lambda fn=fn: fn(xg)) / (T * N)
        if device == "cpu" and name != "eager":
            rows["fwd+bwd"][f"faults_{name}"] = page_faults_per_call(
                lambda fn=fn, name=name: fwd_bwd(fn, name)
            )
        if device == "cuda" and name != "eager":
            xg.grad = None  # so that the baseline holds only the inputs
            rows["fwd+bwd"][f"peak_MiB_{name}"] = cuda_peak_bytes(lambda fn=fn: fwd_bwd(fn)) / 2**20
    out = []
    for p, r in rows.items():
        ours = r.get("ours_ms")
        for other in ("sj", "eager"):
            if ours and r.get(f"{other}_ms"):
                r[f"x_{other}"] = r[f"{other}_ms"] / ours
        for name in fns:
            if name.startswith("ours_") and r.get(f"{name}_ms") and r.get("sj_ms"):
                r[f"x_sj_{name.removeprefix('ours_')}"] = r["sj_ms"] / r[f"{name}_ms"]
        r["floor_ms"] = floor_ms[p]
        if ours:
            r["ours/floor"] = ours / r["floor_ms"]
        out.append(r)
    return out


def headline_repeats(fns: dict, dev: str, n: int, args) -> dict:
    """The headline fwd+bwd config run ``args.repeat`` more times, each with its own copy-bandwidth
    measurement: min / median / max of x_sj and ours/floor, for the README's headline."""
    if args.quick or args.repeat <= 0:
        return {}
    T, dtype = (4, torch.float32) if dev == "cpu" else (4, torch.float16)
    extra = [name.removeprefix("ours_") for name in fns if name.startswith("ours_")]
    x_sj, over_floor, x_sj_extra = [], [], {name: [] for name in extra}
    for _ in range(args.repeat):
        (row,) = bench_config(fns, T, n, dtype, dev, passes=("fwd+bwd",))
        if row.get("x_sj"):
            x_sj.append(row["x_sj"])
        for name in extra:
            if row.get(f"x_sj_{name}"):
                x_sj_extra[name].append(row[f"x_sj_{name}"])
        over_floor.append(row["ours/floor"])

    def spread(v):
        v = sorted(v)
        return [round(v[0], 2), round(v[len(v) // 2], 2), round(v[-1], 2)] if v else None

    label = f"T{T}_{str(dtype).removeprefix('torch.')}_N{n}_fwd_bwd"
    spreads = {f"repeat_x_sj_{name}": spread(v) for name, v in x_sj_extra.items() if v}
    print(
        f"{args.repeat} repeats of {label}: x_sj min/median/max {spread(x_sj)}, "
        f"ours/floor {spread(over_floor)}" + "".join(f", {k} {v}" for k, v in spreads.items())
    )
    return {
        "repeats": args.repeat,
        "repeat_config": label,
        "repeat_x_sj": spread(x_sj),
        "repeat_ours_over_floor": spread(over_floor),
        **spreads,
    }


# In-cache kernel configs: (T, dtype); N is chosen so that T x N = 65,536 neuron-steps.
KERNEL_CONFIGS = ((4, torch.float32), (4, torch.bfloat16), (4, torch.float16), (16, torch.float32))


def kernel_rows(reps: int = 30, calls: int = 20) -> list[dict]:
    """One thread, data in cache: ns per neuron-step of the C++ kernels' forward and backward ops, called
    directly on preallocated outputs (no autograd, no allocation), for each ISA build that runs here, min
    over ``reps`` interleaved rounds of ``calls`` calls. 65,536 neuron-steps: inputs and outputs fit a 1 MiB
    L2. The 2^20-neuron rows depend as much on the memory bandwidth a shared VM gets in the run as on the
    kernels; these move by a few percent from run to run, so they show what a kernel change did."""
    from spikecore.neuron.surrogate import SURROGATES

    builds = {isa: _cpu_cpp._build(False, isa) for isa in _cpu_cpp.available_isas()}
    builds = {isa: ext for isa, ext in builds.items() if ext is not None}
    sg = SURROGATES["sigmoid"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for T, dtype in KERNEL_CONFIGS:
            N = 65_536 // T
            x = (torch.randn(T, N) * 1.5 + 1.0).to(dtype)
            g = torch.randn(T, N).to(dtype)
            s, gx, v = torch.empty_like(x), torch.empty_like(x), torch.empty(N)

            # tau 2, V_th 1, V_reset 0, hard reset, decay_input, no v_init (so no grad v_init, as
            # lif_multi_step calls it); backward: detached reset, the sigmoid
            fwd_args = (x, None, None, 2.0, 1.0, 0.0, False, True, s, v, None)
            bwd_args = (g, None, x, None, None, 2.0, 1.0, 0.0, False, True, True, sg.id, sg.default_alpha)
            bwd_args += (gx, None, None)
            best = {(p, isa): float("inf") for p in ("fwd", "bwd") for isa in builds}
            for _ in range(reps):
                for isa, ext in builds.items():
                    calls_of = {"fwd": functools.partial(ext.lif_fwd, *fwd_args)}
                    calls_of["bwd"] = functools.partial(ext.lif_bwd, *bwd_args)
                    for p, fn in calls_of.items():
                        fn()
                        start = time.perf_counter()
                        for _ in range(calls):
                            fn()
                        ns = (time.perf_counter() - start) / calls / (T * N) * 1e9
                        best[p, isa] = min(best[p, isa], ns)
            for p in ("fwd", "bwd"):
                row = {"T": T, "N": N, "dtype": str(dtype).removeprefix("torch."), "pass": p}
                row.update({f"{isa}_ns": round(best[p, isa], 3) for isa in builds})
                rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def transparent_hugepage() -> str | None:
    """Linux's THP mode (always / madvise / never): whether the kernels' huge-page advice takes effect."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else text.strip()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--ours-backend", help="spikecore backend of 'ours' (default: cpu, or triton on CUDA)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="run the headline config (T=4, fp32 on CPU / fp16 4.2M neurons on CUDA, fwd+bwd) this many "
        "more times and record the spread of the ratios (a shared machine's bandwidth varies by 1.5x)",
    )
    ap.add_argument("--keep-memory-worker", help=argparse.SUPPRESS)  # T list: the keep-memory table's process
    ap.add_argument("--n", type=int, default=2**20, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    apply_threads(args)
    if args.keep_memory_worker:
        _keep_memory_worker([int(t) for t in args.keep_memory_worker.split(",")], args.n)
        return
    dev = args.device
    torch.manual_seed(0)
    N = 2**12 if args.quick else 2**20
    Ts = (4,) if args.quick else (4, 8, 16)
    configs = [(T, N, torch.float32) for T in Ts]
    if dev == "cpu":
        configs += [(4, N, torch.bfloat16), (4, N, torch.float16)]
    else:
        configs += [(T, N, dt) for dt in (torch.float16, torch.bfloat16) for T in Ts]
        configs.append((4, 2**12 if args.quick else 4_194_304, torch.float16))  # the docs' fp16 anchor

    fns = impls(dev, args.ours_backend or ("cpu" if dev == "cpu" else "triton"))
    first_call_s = first_call(fns["ours"], dev)
    bw = copy_bandwidth_gbs(dev, 2**22 if args.quick else 2**28)
    for name in fns:
        if name.startswith("ours_"):
            with contender_env(name):
                first_call(fns[name], dev)  # its build or JIT compilation, outside the timings
    print(f"copy bandwidth {bw:.1f} GB/s; ours first call {first_call_s:.2f} s; sj: {sj_impl_name(dev)}")
    rows = []
    for T, n, dt in configs:
        print(f"LIF T={T} N={n} {dt} ...", flush=True)
        rows += bench_config(fns, T, n, dt, dev)
    for r in rows:
        if r["pass"] == "fwd+bwd":
            r["sj_impl"] = sj_impl_name(dev)
    repeats = headline_repeats(fns, dev, N if dev == "cpu" else (2**12 if args.quick else 4_194_304), args)
    tables = {}
    if dev == "cpu":
        if kept := keep_memory_rows(Ts, N, args.threads):  # [] when its worker failed (printed)
            tables[KEEP_MEMORY_TABLE] = kept
        reps = 3 if args.quick else 30
        tables[KERNEL_TABLE.format(reps=reps)] = kernel_rows(reps=reps)
    save(
        "lif",
        dev,
        rows,
        write=not args.quick,
        copy_bw_gbs=round(bw, 1),
        **({"transparent_hugepage": transparent_hugepage()} if dev == "cpu" else {}),
        ours_first_call_s=round(first_call_s, 2),
        legend=LEGEND,
        **repeats,
        **({"tables": tables} if tables else {}),
    )


if __name__ == "__main__":
    main()
