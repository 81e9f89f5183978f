"""Build (once per machine, on first use) and load the C++ CPU kernels in ``_cpu_kernels.cpp``.

torch's extension loader compiles the file with the machine's C++ compiler and caches the library under
``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR`` moves it): about 50-100 s the first time, a fraction
of a second after that. Where no compiler (or no ninja) is at hand the build fails once, a warning says so,
and ``_cpu`` falls back to its numba kernels.
"""

import functools
import hashlib
import os
import platform
import shutil
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("_cpu_kernels.cpp")


def _put_ninja_on_path() -> None:
    """torch's loader runs ``ninja`` from PATH; the ninja wheel (a dependency) has it in its own folder."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


# native: -march=native (AVX-512, AVX2 or NEON, as the CPU has); avx2: the same without AVX-512 (what an
# AVX2-only x86-64 gets); sse4: x86-64-v2, 128-bit vectors with no FMA and no F16C, so the generic code paths
# a NEON build takes (one 128-bit register per vector, the integer float16 conversions) run and are tested
# on x86 too.
ISAS = ("native", "avx2", "sse4")


def _is_x86() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


def _cpu_flags() -> set[str]:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("flags"):
                return set(ln.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def vector_isa() -> str:
    """The widest vector instruction set of this CPU, as the native build uses it."""
    if _is_x86():
        flags = _cpu_flags()
        return next((f for f in ("avx512f", "avx2", "avx") if f in flags), "sse2")
    return "neon" if platform.machine() in ("aarch64", "arm64") else platform.machine()


def available_isas() -> tuple[str, ...]:
    """ISA builds that run here and differ: ``native``; on x86-64 also ``avx2`` where the CPU has AVX-512,
    and ``sse4`` where it has AVX2 or more."""
    if not _is_x86():
        return ("native",)
    flags = _cpu_flags()
    return (
        ("native",)
        + (("avx2",) if {"avx2", "avx512f"} <= flags else ())
        + (("sse4",) if "avx2" in flags else ())
    )


def _isa() -> str:
    isa = os.environ.get("SPIKECORE_CPU_ISA", "native")
    if isa not in ISAS:
        raise ValueError(f"SPIKECORE_CPU_ISA must be one of {', '.join(ISAS)}, got {isa!r}")
    if isa != "native" and not _is_x86():
        raise ValueError(f"SPIKECORE_CPU_ISA={isa} needs an x86-64 CPU")
    return isa


def _flags(isa: str = "native") -> list[str]:
    flags = ["-O3", "-fopenmp"]
    if _is_x86():
        if isa == "sse4":
            flags += ["-march=x86-64-v2", "-mtune=native"]
        else:
            flags.append("-march=native")
        if isa == "avx2":
            flags.append("-mno-avx512f")  # turns off every AVX-512 extension with it
    elif platform.machine() in ("aarch64", "arm64"):
        flags.append("-mcpu=native")
    return flags


def _cpu_fingerprint() -> str:
    """-march=native binds the library to this CPU: the cache key includes its model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def extension():
    """The compiled module, or None: numba chosen (``SPIKECORE_CPU_KERNELS=numba``), or the C++ kernels
    cannot be built here (a warning says why, once). ``SPIKECORE_CPU_KERNELS=cpp`` makes a failed build an
    error instead."""
    choice = os.environ.get("SPIKECORE_CPU_KERNELS", "auto")
    if choice not in ("auto", "cpp", "numba"):
        raise ValueError(f"SPIKECORE_CPU_KERNELS must be auto, cpp or numba, got {choice!r}")
    return None if choice == "numba" else _build(choice == "cpp", _isa())


@functools.cache
def _build(required: bool, isa: str = "native"):
    flags = _flags(isa)
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + _cpu_fingerprint().encode())
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()

        return load(
            name=f"spikecore_lif_cpu_{isa}_{key.hexdigest()[:12]}",
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, a failed build: numba still works
        if required:
            raise RuntimeError(f"SPIKECORE_CPU_KERNELS=cpp but the C++ kernels did not build: {err}") from err
        warnings.warn(
            f"spikecore: the C++ CPU kernels did not build ({type(err).__name__}: {str(err)[:200]}); "
            "using the numba kernels, about 2-3x slower. Install a C++ compiler and ninja to get them.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
