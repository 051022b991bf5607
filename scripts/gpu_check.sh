#!/usr/bin/env bash
# One command for a GPU machine: build, GPU tests, benchmarks, with logs under $OUT (default ./gpu_out).
# Expects a Python that already has torch and triton (the GPU machines' image does).
#
#   bash scripts/gpu_check.sh                # everything
#   BENCH_FILTER=gated bash scripts/gpu_check.sh   # only benchmarks whose name matches
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

{
  git log -1 --format='commit %H %cd' 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

$PY -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tee "$OUT/build.log" | tail -3
$PY -c "import json, rnan_fast; print(json.dumps(rnan_fast.backend_info()))" | tee -a "$OUT/env.txt"

$PY -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
$PY -m pytest benchmarks -q -p no:cacheprovider ${BENCH_FILTER:+-k "$BENCH_FILTER"} \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=median,iqr,rounds \
    2>&1 | tee "$OUT/bench.log" | tail -40
