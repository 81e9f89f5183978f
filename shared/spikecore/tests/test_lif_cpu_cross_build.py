"""The C++ CPU kernels compile for arm64 (NEON) Linux and macOS.

No test machine is arm64, so the NEON build never runs here (its generic 128-bit code paths run as the
x86-64-v2 build in test_lif_cpu.py). This compiles the same source with Clang for both arm64 targets, with
zig's toolchain and sysroots (the ``ziglang`` wheel, a dev dependency): a change that breaks the arm64
build (an x86 intrinsic outside its guard, a vector-extension construct Clang rejects, a NEON type error)
fails here rather than on a user's Mac. The object is generated (-c), not only parsed, so that the
back end lowers every vector operation for the target.
"""

import subprocess
import sys
import sysconfig

import pytest
from torch.utils.cpp_extension import include_paths

from spikecore.neuron import _cpu_cpp

TARGETS = ("aarch64-linux-gnu", "aarch64-macos")


@pytest.mark.timeout(600)
def test_cpu_kernels_compile_for_arm64(tmp_path):
    includes = [*include_paths(), sysconfig.get_paths()["include"]]
    common = [
        sys.executable,
        "-m",
        "ziglang",
        "c++",
        "-std=c++20",
        "-O1",
        "-DTORCH_EXTENSION_NAME=spikecore_lif_cpu",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-w",  # torch's headers warn under Clang; errors are what this test is about
        *(f"-isystem{p}" for p in includes),
        "-c",
        str(_cpu_cpp.SOURCE),
    ]
    procs = {
        target: subprocess.Popen(
            [*common, "-target", target, "-o", str(tmp_path / f"{target}.o")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for target in TARGETS
    }
    for target, proc in procs.items():
        out, _ = proc.communicate(timeout=540)
        assert proc.returncode == 0, f"{target}:\n{out[-4000:]}"
        obj = tmp_path / f"{target}.o"
        assert obj.stat().st_size > 100_000  # the kernels' code, not an empty translation unit
        magic = obj.read_bytes()[:4]
        # ELF for Linux, Mach-O (64-bit, little-endian) for macOS
        assert magic == (b"\x7fELF" if "linux" in target else b"\xcf\xfa\xed\xfe"), (target, magic)
