"""Builds rnan_fast._C (C++ always; CUDA too when PyTorch has CUDA and a toolkit is found).

setup.py imports torch, so install with `pip install --no-build-isolation -e .` (an isolated
build environment would download a second, different torch to compile against).

Environment:
  CUDA_HOME              the CUDA toolkit (default: /usr/local/cuda when it exists)
  TORCH_CUDA_ARCH_LIST   GPU architectures to compile for (default "9.0": H100/H200); no GPU needed
  RNAN_FAST_NO_CUDA=1    build the C++ kernels only
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    # Decide from torch.version.cuda and the toolkit, never from a visible GPU: CI has none.
    if os.environ.get("RNAN_FAST_NO_CUDA", "0") not in ("", "0") or torch.version.cuda is None:
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    return home if home and os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cxx = ["-O3"]  # the C++ standard comes from torch.utils.cpp_extension (C++20 from torch 2.13 on)
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline and only runs in parallel when compiled with OpenMP; at load
        # time libgomp.so.1 resolves to the one torch has already loaded (one OpenMP runtime).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    cuda_home = _cuda_home()
    if cuda_home and cu:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it compiles
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
