"""The C++ extension as built: the elementwise loops of both CPU kernels are vectorised.

Each loop marked RNAN_CPU_CLONES (csrc/cpu_math.h) is compiled for three x86-64 levels; the
x86-64-v3 clone (AVX2 + FMA) of every loop that evaluates a polynomial exp must hold packed FMAs
on ymm registers. GCC 12 kept them scalar without -fno-trapping-math (setup.py), which left the
attention's exp loops at 45% of a training-shape call and the kernel 4x slower (BENCHMARKS.md).
Read from the shared object with binutils' nm and objdump.
"""
import platform
import re
import shutil
import subprocess

import pytest

from rnan_fast import _ext

# Loops with a polynomial exp (exp2_f32 in nonlocal_attention.cpp, exp_f32 in gated_residual.cpp).
EXP_LOOPS = ("col_stats_update", "col_weights", "row_weights", "row_online",
             "fwd_f32", "bwd_f32", "fwd_bf16", "bwd_bf16", "fwd_f16", "bwd_f16")

pytestmark = [
    pytest.mark.skipif(not _ext.EXTENSION, reason=f"the extension is not built ({_ext.EXTENSION_ERROR})"),
    pytest.mark.skipif(platform.machine() != "x86_64" or platform.system() != "Linux",
                       reason="the target clones exist in x86-64 Linux builds only"),
    pytest.mark.skipif(not (shutil.which("nm") and shutil.which("objdump")), reason="needs binutils (nm, objdump)"),
]


def _v3_clones():
    """{function name: (address, size)} of the x86-64-v3 clones in rnan_fast._C."""
    from rnan_fast import _C

    listing = subprocess.run(["nm", "-C", "-S", "--defined-only", _C.__file__], capture_output=True, text=True,
                             check=True).stdout
    clones = {}
    for line in listing.splitlines():
        m = re.match(r"([0-9a-f]+) ([0-9a-f]+) [tT] rnan_fast::\(anonymous namespace\)::(\w+)\(.*"
                     r"\[clone \.arch_x86_64_v3\]$", line)
        if m:
            clones[m[3]] = (int(m[1], 16), int(m[2], 16))
    return _C.__file__, clones


@pytest.mark.parametrize("name", EXP_LOOPS)
def test_exp_loops_are_vectorised_in_the_avx2_clone(name):
    path, clones = _v3_clones()
    assert name in clones, f"no x86-64-v3 clone of {name} in {path} (found: {sorted(clones)})"
    start, size = clones[name]
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={start:#x}",
                           f"--stop-address={start + size:#x}", path], capture_output=True, text=True,
                          check=True).stdout
    packed = len(re.findall(r"\bvfn?m(?:add|sub)\d+ps\s+.*%ymm", code))
    scalar = len(re.findall(r"\bvfn?m(?:add|sub)\d+ss\b", code))
    # A vectorised exp loop holds the polynomial's 5-6 FMAs at least once on ymm registers (its
    # scalar remainder loop keeps a scalar copy, so scalar FMAs alone prove nothing).
    assert packed >= 5, f"{name}: {packed} packed ymm FMAs, {scalar} scalar ones: the loop is not vectorised"
