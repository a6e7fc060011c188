"""The torch-free CPU kernel core (cuda/fff_cpu_kernel.h) built and run for every instruction set.

Each case compiles cuda/cpu_test/fff_cpu_kernel_test.cpp (forward and backward in fp32, fp64, bf16 and
fp16 over a shape grid, against its own double-precision reference) for one target with g++ into
tmp_path and runs it: x86-64 (SSE2), x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512) natively when this
CPU has the instructions, and aarch64 (NEON) through a cross compiler and qemu-user. A case skips, saying
why, when its compiler, emulator or instructions are missing here. benchmarks/cpu_isa.sh does the same
from a shell and prints a table.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "cuda" / "cpu_test" / "fff_cpu_kernel_test.cpp"
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"

# (name, compiler, -march, /proc/cpuinfo flags needed to run natively, the ISA the binary must report)
X86_TARGETS = [
    ("sse2", "g++", "x86-64", set(), "sse2"),
    ("avx2", "g++", "x86-64-v3", {"avx2", "fma", "f16c"}, "avx2+fma"),
    ("avx512", "g++", "x86-64-v4", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}, "avx512"),
]


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(compiler: str, march: str, output: Path) -> None:
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed")
    command = [compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-march={march}", f"-I{REPO / 'cuda'}", str(HARNESS), "-o", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-4000:]}"


def run_harness(command: list[str], expected_isa: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "PASSED" in output, output[-6000:]
    assert f"isa {expected_isa}," in output.splitlines()[0], output.splitlines()[0]


@pytest.mark.slow  # builds or runs a fresh process: more than ~5 s
@pytest.mark.parametrize("name, compiler, march, needed, isa", X86_TARGETS, ids=[t[0] for t in X86_TARGETS])
def test_kernel_core_on_x86(tmp_path, name, compiler, march, needed, isa):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"an x86-64 target; this machine is {platform.machine()}")
    binary = tmp_path / f"fff_cpu_kernel_test_{name}"
    build(compiler, march, binary)
    missing = needed - cpu_flags()
    if missing:
        pytest.skip(f"built for {march}, but this CPU lacks {sorted(missing)} to run it")
    run_harness([str(binary)], isa)


@pytest.mark.slow
def test_kernel_core_on_aarch64_under_qemu(tmp_path):
    compiler = "aarch64-linux-gnu-g++"
    if shutil.which("qemu-aarch64") is None and platform.machine() != "aarch64":
        pytest.skip("qemu-aarch64 is not installed (apt-get install qemu-user)")
    if platform.machine() == "aarch64":
        compiler = "g++"
    elif shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not installed (apt-get install g++-aarch64-linux-gnu)")
    binary = tmp_path / "fff_cpu_kernel_test_aarch64"
    build(compiler, "armv8-a", binary)
    command = [str(binary)] if platform.machine() == "aarch64" else ["qemu-aarch64", "-L", AARCH64_SYSROOT, str(binary)]
    run_harness(command, "neon")
