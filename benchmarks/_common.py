"""Shared benchmark plumbing: machine and version description, timing, memory, results files.

CPU timings use ``torch.utils.benchmark.Timer.blocked_autorange`` (median); CUDA timings use
``triton.testing.do_bench`` (median of timed runs, L2 flushed between them). Results go to
``benchmarks/results/<name>-<cpu|cuda>.json``; ``write_readme()`` turns every JSON there into one markdown
table in ``benchmarks/results/README.md``.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------------------- description
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine(device: str) -> dict:
    from spikecore.neuron._cpu_cpp import vector_isa

    info = {
        "cpu": _cpu_model(),
        "vector_isa": vector_isa(),  # every CPU figure states it: speed-ups differ by ISA
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": _ram_gib(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in (
        "torch",
        "triton",
        "numba",
        "spikingjelly",
        "spikecore",
        "tdformer",
        "spiliformer",
        "sae-brainmap",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit() -> str:
    """Short HEAD hash; 'uncommitted' (with the base hash when there is one) if the tree differs from it."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "uncommitted"
    sha = head.stdout.strip()
    return f"uncommitted (on {sha})" if dirty else sha


def add_common_args(ap) -> None:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", choices=("cpu", "cuda"), default=default)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, results not saved: a smoke run")
    ap.add_argument("--threads", type=int, help="torch (and numba) CPU threads (default: torch's default)")


def apply_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


# ---------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, min_run_time: float = 0.3, warmup: bool = True) -> float:
    """Median milliseconds per call of ``fn()``."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    if warmup:
        fn()  # first-call compilation, allocator
        # Then at least 3 calls and 0.3 s (2 s at most): on a VM the first calls of a large config run several
        # times slower (its fresh memory is faulted in, huge pages zeroed: T=8 LIF at 2^20 neurons took
        # 50-100 ms a call for 4 calls, then 20 ms), which the rounds' medians should not see, for every
        # contender alike.
        start, calls = time.perf_counter(), 0
        while (calls < 3 or time.perf_counter() - start < 0.3) and time.perf_counter() - start < 2.0:
            fn()
            calls += 1
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def time_many(fns: dict, device: str, rounds: int = 3) -> dict:
    """``{name: median ms}`` for several callables. On CPU they are timed in interleaved rounds and the
    median of the per-round medians is kept, so that a burst of load from other processes hits every
    contender alike instead of one. A callable that raises gets ``None`` (the error is printed)."""
    times: dict = {name: [] for name in fns}
    for r in range(1 if device == "cuda" else rounds):
        for name, fn in fns.items():
            if times[name] is None:
                continue
            try:
                times[name].append(time_ms(fn, device, min_run_time=0.15, warmup=r == 0))
            except Exception as e:
                print(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                times[name] = None
            sync(device)
    return {k: (sorted(v)[len(v) // 2] if v else None) for k, v in times.items()}


def copy_fn(device: str, nbytes: int):
    """A callable copying ``nbytes`` into another ``nbytes`` (``dst.copy_(src)``, fp32, made once)."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_bandwidth_gbs(device: str, nbytes: int = 2**28) -> float:
    """Measured ``dst.copy_(src)`` bandwidth in GB/s, counting bytes read plus bytes written."""
    ms = time_ms(copy_fn(device, nbytes), device, min_run_time=0.5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------- memory
def saved_bytes(fn) -> int:
    """Bytes of distinct storages that autograd saves for backward while ``fn()`` runs (its graph is kept
    only during the call). Inputs saved by reference count too: they must stay alive for backward."""
    seen: dict[tuple, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[(t.device.type, st.data_ptr())] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def cuda_peak_bytes(fn) -> int:
    """Peak CUDA memory allocated by ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# --------------------------------------------------------------------------------------------- results
def header(device: str) -> dict:
    return {
        "machine": machine(device),
        "versions": versions(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict]) -> str:
    """Markdown table of ``rows`` (columns: the union of keys, in first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(doc: dict) -> str:
    m, v = doc["machine"], doc["versions"]
    dev = f"{m['gpu']} ({m['gpu_mem_gib']} GiB), " if m.get("gpu") else ""
    isa = f" ({m['vector_isa']})" if m.get("vector_isa") else ""
    keys = (
        "copy_bw_gbs",
        "ours_first_call_s",
        "repeat_config",
        "repeat_x_sj",
        "repeat_ours_over_floor",
        "repeat_x_sj_avx2",
        "repeat_x_sj_sse4",
        "repeat_x_sj_numba",
        "transparent_hugepage",
        "note",
    )
    extra = "".join(f", {k} {doc[k]}" for k in keys if doc.get(k) is not None)
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    return (
        f"{dev}{m['cpu']}{isa}, {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"{m['ram_gib']} GiB RAM; "
        f"{vers}; commit {doc['commit']}; {doc['date']}{extra}"
    )


def save(name: str, device: str, rows: list[dict], write: bool = True, **extra) -> Path | None:
    """Print the table; with ``write``, also write ``results/<name>-<device>.json`` and regenerate
    results/README.md."""
    doc = {**header(device), **extra, "rows": rows}
    print(f"\n{name} ({device}): {machine_line(doc)}\n{table(rows)}")
    for title, extra_rows in doc.get("tables", {}).items():
        print(f"\n{title}\n{table(extra_rows)}")
    if not write:
        return None
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{device}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    write_readme()
    print(f"-> {path.relative_to(ROOT)}")
    return path


def write_readme() -> Path:
    parts = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/run_all.py` from the JSON files beside this one (do not edit by "
        "hand). Times are medians in ms; each table's legend and the docstring of its script in benchmarks/ "
        "say what the columns mean.",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        parts += ["", f"## {path.stem}", "", machine_line(doc), ""]
        if doc.get("legend"):
            parts += [doc["legend"], ""]
        parts.append(table(doc["rows"]))
        for title, extra_rows in doc.get("tables", {}).items():  # further tables of the same run
            parts += ["", f"{title}:", "", table(extra_rows)]
    out = RESULTS / "README.md"
    out.write_text("\n".join(parts) + "\n")
    return out
