"""Builds rnan_fast._C (C++; CUDA too when PyTorch has CUDA and a toolkit is found), or nothing
with RNAN_FAST_NO_EXT=1.

setup.py imports torch, so install with `pip install --no-build-isolation -e .` (an isolated
build environment would download a second, different torch to compile against).

Environment:
  CUDA_HOME              the CUDA toolkit (default: what torch.utils.cpp_extension finds, i.e.
                         CUDA_PATH, the toolkit of `which nvcc`, or /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST   GPU architectures to compile for (default "7.5;8.0;8.6;8.9;9.0+PTX": RTX 20
                         to H200, PTX for newer); no GPU needed
  RNAN_FAST_NO_CUDA=1    build the C++ kernels only
  RNAN_FAST_NO_EXT=1     build nothing: a pure-Python install (the ops run on the reference, with a
                         warning at run time); without it a failed build stops with what is missing
"""
import glob
import os
import re
import shutil
import sys
import sysconfig

from setuptools import setup

import torch
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(home):
    return bool(home) and all(os.path.exists(os.path.join(home, *p)) for p in (("bin", "nvcc"),
                                                                              ("include", "cuda_runtime.h")))


def cuda_home():
    """The CUDA toolkit to compile the CUDA kernels with, or None (C++ kernels only).

    Decided from torch.version.cuda (a CUDA build of PyTorch) and a toolkit, never from a visible
    GPU: CI compiles them without one. The toolkit is the one torch.utils.cpp_extension found
    (CUDA_HOME or CUDA_PATH, else the parent of `which nvcc`, else /usr/local/cuda) if it holds
    nvcc and the runtime headers; when neither variable is set and that guess is no toolkit (an
    nvcc wrapper script in /usr/local/bin makes it /usr/local), /usr/local/cuda.
    RNAN_FAST_NO_CUDA=1: None.
    """
    if os.environ.get("RNAN_FAST_NO_CUDA", "0") not in ("", "0") or torch.version.cuda is None:
        return None
    candidates = [cpp_extension.CUDA_HOME]
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        candidates.append("/usr/local/cuda")
    return next((home for home in candidates if _is_toolkit(home)), None)


# PyTorch's own CUDA 13 builds hold sm_75, sm_80, sm_86 and sm_90 (torch.cuda.get_arch_list());
# sm_89 (RTX 40, L4, L40) gets its own SASS, and compute_90 PTX lets the driver compile the gate
# for newer GPUs (sm_100, sm_120). The CUDA 13 nvcc accepts each of them (nvcc --list-gpu-arch).
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def cuda_archs() -> tuple[list[int], list[int]]:
    """([SASS architectures], [PTX architectures]) as 10 * major + minor, from the nvcc -gencode
    flags torch.utils.cpp_extension derives from TORCH_CUDA_ARCH_LIST (named forms such as
    "Ampere" included)."""
    sass, ptx = [], []
    for flag in cpp_extension._get_cuda_arch_flags():
        for kind, arch in re.findall(r"(sm|compute)_(\d+)", flag.split("code=")[-1]):
            (sass if kind == "sm" else ptx).append(int(arch))
    return sorted(set(sass)), sorted(set(ptx))


def extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # The C++ standard comes from torch.utils.cpp_extension (C++20 from torch 2.13 on).
    # -fno-trapping-math: no FP exception is ever unmasked here, and without it GCC 12 keeps every
    # loop calling the polynomial exps scalar ("control flow in loop": it will not evaluate both
    # sides of their selects), which made the attention's exp loops 45% of a training-shape call.
    # It permits no reassociation or other change of a value.
    cxx = ["-O3", "-fno-trapping-math"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline and only runs in parallel when compiled with OpenMP; at load
        # time libgomp.so.1 resolves to the one torch has already loaded (one OpenMP runtime).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    home = cuda_home()
    print(f"rnan_fast: CUDA kernels {'with ' + home if home else 'not built'} (torch.version.cuda "
          f"{torch.version.cuda}, torch's CUDA_HOME {cpp_extension.CUDA_HOME})", file=sys.stderr)
    if home and cu:
        cpp_extension.CUDA_HOME = home  # the toolkit torch.utils.cpp_extension compiles with
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sass, ptx = cuda_archs()
        print(f"rnan_fast: CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']!r}: SASS "
              f"{', '.join(f'sm_{a}' for a in sass) or 'none'}; PTX {', '.join(f'compute_{a}' for a in ptx) or 'none'}",
              file=sys.stderr)
        return [CUDAExtension(
            "rnan_fast._C", cpp + cu,
            define_macros=[("RNAN_FAST_WITH_CUDA", "1")],
            # No --use_fast_math: exact expf and divide cost nothing in a memory-bound kernel,
            # and keep the CUDA sigmoid as accurate as the CPU one. The C++ side records what the
            # gate was compiled for (rnan_fast._C.cuda_archs()), so that a GPU it cannot run on
            # falls back instead of failing with "no kernel image"; as comma lists, hence not in
            # define_macros, which nvcc would pass on through -Xcompiler (it splits at commas).
            extra_compile_args={"cxx": cxx + [f"-DRNAN_FAST_CUDA_SASS={','.join(map(str, sass))}",
                                              f"-DRNAN_FAST_CUDA_PTX={','.join(map(str, ptx))}"],
                                "nvcc": ["-O3"]},
            extra_link_args=link,
        )]
    return [CppExtension("rnan_fast._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link)]


def no_ext():
    """RNAN_FAST_NO_EXT=1: no compiled kernels at all (a pure-Python package)."""
    return os.environ.get("RNAN_FAST_NO_EXT", "0") not in ("", "0")


def missing_pieces():
    """What compiling rnan_fast._C needs and this machine lacks, one line each ([] when all is there)."""
    missing = []
    cxx = cpp_extension.get_cxx_compiler()   # what torch's ninja build compiles with: $CXX, else c++
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler: {cxx!r} is not on PATH (install g++ or clang, or point CXX at one)")
    python_h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.isfile(python_h):
        missing.append(f"the Python headers: {python_h} is missing (e.g. the python3-dev package)")
    if not any(os.path.isfile(os.path.join(d, "torch", "extension.h")) for d in cpp_extension.include_paths()):
        missing.append(f"PyTorch's C++ headers: no torch/extension.h under {cpp_extension.include_paths()[0]} "
                       f"(a torch install without its include folder)")
    # No CUDA check here: cuda_home() builds the CUDA kernels only with a toolkit that holds nvcc
    # and its headers; a toolkit that does not fit torch fails in the build (reported below).
    return missing


def failure_message(pieces):
    lines = ["rnan_fast: cannot build the compiled kernels rnan_fast._C:"] + [f"  - {p}" for p in pieces]
    lines.append("Install what is missing and retry, or set RNAN_FAST_NO_EXT=1 for a pure-Python install "
                 "(the reference ops: the same results, about 10x slower on a CPU; a warning says so at run "
                 "time); RNAN_FAST_NO_CUDA=1 leaves out the CUDA kernels only.")
    return "\n".join(lines)


class BuildExtensionExplained(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension (ninja), which first checks for the compiler and the Python and torch
    headers, and turns a failed compile into one message naming the missing piece (or the
    compiler's complaint, with the CUDA toolkit when the CUDA kernels were being built) and the
    RNAN_FAST_NO_EXT switch."""

    def build_extensions(self):
        missing = missing_pieces()
        if missing:
            raise SystemExit(failure_message(missing))
        try:
            super().build_extensions()
        except Exception as e:  # CompileError, CalledProcessError, torch's RuntimeErrors: one report
            detail = str(e).strip().splitlines()
            cuda = any(src.endswith(".cu") for ext in self.extensions for src in ext.sources)
            where = (f"the compile failed with {type(e).__name__}: {detail[-1] if detail else 'no detail'} "
                     f"(the compiler's output is above)")
            if cuda:
                where += f"; the CUDA toolkit is {cpp_extension.CUDA_HOME}, torch's CUDA {torch.version.cuda}"
            raise SystemExit(failure_message(missing_pieces() or [where])) from e


if no_ext():
    print("rnan_fast: RNAN_FAST_NO_EXT=1: no compiled kernels, a pure-Python install", file=sys.stderr)
setup(
    packages=["rnan_fast", "rnan_fast.cli", "rnan_fast.ops", "rnan_fast.train", "rnan_fast.weights",
              "rnan_fast.kernels"],
    package_data={"rnan_fast.weights": ["*.safetensors", "*.json"]},  # the shipped models and their cards
    package_dir={"rnan_fast.kernels": "kernels"},
    ext_modules=[] if no_ext() else extensions(),
    cmdclass={"build_ext": BuildExtensionExplained},
)
