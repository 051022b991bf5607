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
# scikit-image: the sample photos of `rnan-fast demo`; bm3d: `rnan-fast eval --baseline bm3d`
# (both optional extras of the package, installed here so that the demo and every test run)
.venv/bin/python -m pip install -q scikit-image bm3d
echo "setup: building rnan_fast (C++ kernels${CUDA_HOME:+, CUDA kernels with $CUDA_HOME})" >&2
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import json, rnan_fast; print(json.dumps(rnan_fast.backend_info(), indent=1))"
