#!/usr/bin/env bash
# Sets up .venv with PyTorch and builds rnan_fast into it (editable). Safe to run again.
#
#   PYTHON=python3.11 bash scripts/setup.sh     # choose the interpreter (default python3)
#   TORCH_SPEC="torch==2.14.1"                  # the PyTorch to install (default: this pin)
#   CUDA_HOME=/usr/local/cuda                   # compile the CUDA kernels too (default when present)
#
# setup.py imports torch to compile the extension, so the install runs with
# --no-build-isolation: an isolated build would fetch a second torch and build against it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "setuptools>=64" wheel
.venv/bin/python -m pip install -q "$TORCH_SPEC" ninja numpy pillow tqdm pytest pytest-benchmark
# opencv-python-headless, tifffile: 16-bit colour PNG / TIFF photos (dependencies of the package)
.venv/bin/python -m pip install -q opencv-python-headless tifffile
# scikit-image: the sample photos of `rnan-fast demo`; bm3d, colour-demosaicing: `rnan-fast eval
# --baseline bm3d / menon` (optional extras of the package, installed here so that every test runs)
.venv/bin/python -m pip install -q scikit-image bm3d colour-demosaicing
# safetensors: the shipped weights' format; onnx, onnxscript, onnxruntime: `rnan-fast export --onnx` and
# its check (the onnx extra); build: `python -m build --wheel --no-isolation` (README, Install)
.venv/bin/python -m pip install -q safetensors onnx onnxscript onnxruntime build
echo "setup: building rnan_fast (C++ kernels${CUDA_HOME:+, CUDA kernels with $CUDA_HOME})" >&2
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import json, rnan_fast; print(json.dumps(rnan_fast.backend_info(), indent=1))"
