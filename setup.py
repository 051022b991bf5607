"""Builds rnan_fast._C (C++ always; CUDA too when PyTorch has CUDA and a toolkit is found).

setup.py imports torch, so install with `pip install --no-build-isolation -e .` (an isolated
build environment would download a second, different torch to compile against).

Environment:
  CUDA_HOME              the CUDA toolkit (default: what torch.utils.cpp_extension finds, i.e.
                         CUDA_PATH, the toolkit of `which nvcc`, or /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST   GPU architectures to compile for (default "9.0": H100/H200); no GPU needed
  RNAN_FAST_NO_CUDA=1    build the C++ kernels only
"""
import glob
import os
import sys

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
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        return [CUDAExtension(
            "rnan_fast._C", cpp + cu,
            define_macros=[("RNAN_FAST_WITH_CUDA", "1")],
            # No --use_fast_math: exact expf and divide cost nothing in a memory-bound kernel,
            # and keep the CUDA sigmoid as accurate as the CPU one.
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
        )]
    return [CppExtension("rnan_fast._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link)]


setup(
    packages=["rnan_fast", "rnan_fast.cli", "rnan_fast.ops", "rnan_fast.train", "rnan_fast.weights",
              "rnan_fast.kernels"],
    package_data={"rnan_fast.weights": ["*.pt", "*.json"]},  # the shipped models and their cards
    package_dir={"rnan_fast.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
