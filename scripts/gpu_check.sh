#!/usr/bin/env bash
# The GPU check: one command for a GPU machine, in stages. Each stage runs under its own time limit,
# writes $OUT/<stage>.log and, as it ends, $OUT/<stage>.json; a failed or timed-out stage never
# stops the later ones. $OUT/summary.json lists them all at the end.
#
#   python scripts/bundle_shared.py          # beforehand, beside ../shared: the tests' data -> .gpu_shared/
#   OUT=gpu_out bash scripts/gpu_check.sh    # on the GPU machine, with .gpu_shared carried along
#
# Stages and budgets (seconds; GPU_CHECK_BUDGET_<STAGE>=s overrides one):
#   build         120  env.txt; pip install --no-build-isolation --no-deps -e . (ninja compiles the
#                      .cu and the .cpp files in parallel, each 200-240 s on a loaded 2-core CPU here,
#                      about a minute unloaded: nvcc for sm_90 is the longest)
#   backend        20  backend_info(): extension, extension_cuda, triton and cuda must all be true
#   tests         150  the GPU-relevant test files, untuned (RNAN_FAST_AUTOTUNE=0), in 6 parallel pytest
#                      processes (one Triton compile costs 1-4 s and compiles run serially in a
#                      process), not stopping at failures; JUnit XML per group
#   bench_kernels 120  P1-P4 (attention forward/backward, memory, gate), each beside the naive official
#                      computation and the peers of the same run; tuning bounded to
#                      RNAN_FAST_AUTOTUNE_MAX=2 candidates per kernel and shape class (~24 compiles);
#                      then pass 2's tiles at N = 512x768 with and without the polynomial exp2
#   bench_model    60  P5 (training step) and P6 (whole 768x512 image), with the official as anchor
# 470 s of budgets and 2 s of grace per stage: the check ends within 8 minutes (machine start excluded).
# PY (default python3) is the interpreter used for everything; data: RNAN_FAST_SHARED (default
# .gpu_shared), required (RNAN_FAST_REQUIRE_SHARED=1), so that missing data fails instead of skipping.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:-gpu_out}"
OUT=$(cd "${OUT:-gpu_out}" && pwd)
export OUT PY=${PY:-python3} PYTHONUNBUFFERED=1
export RNAN_FAST_SHARED=${RNAN_FAST_SHARED:-$PWD/.gpu_shared} RNAN_FAST_REQUIRE_SHARED=1
STAGES=()
FAILED=0
[ -d "$RNAN_FAST_SHARED/fixtures" ] || echo "WARNING: no test data at $RNAN_FAST_SHARED (make it with" \
  "scripts/bundle_shared.py beside ../shared and carry .gpu_shared): the data-reading tests will fail"

# run_stage NAME BUDGET_S FUNCTION: runs FUNCTION under `timeout` (its whole process group is
# stopped at the limit), output to $OUT/NAME.log, then writes $OUT/NAME.json.
run_stage() {
  local name=$1 budget=$2 fn=$3 var
  var="GPU_CHECK_BUDGET_${name^^}"
  budget=${!var:-$budget}
  echo "== $name (budget ${budget} s)"
  local start end rc status
  start=$(date +%s%N)
  timeout -k 2 "$budget" bash -c "$fn" > "$OUT/$name.log" 2>&1
  rc=$?
  end=$(date +%s%N)
  case $rc in
    0) status=passed ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  local seconds counts=""
  seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  [ "$name" = tests ] && counts=", \"counts\": $(junit_counts)"
  printf '{"stage": "%s", "status": "%s", "rc": %d, "seconds": %s, "budget_s": %d, "log": "%s.log"%s}\n' \
    "$name" "$status" "$rc" "$seconds" "$budget" "$name" "$counts" > "$OUT/$name.json"
  STAGES+=("$name")
  [ "$status" = passed ] || FAILED=1
  tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
  echo "   -> $status (rc $rc, ${seconds} s)"
}

# Sums of the testsuite attributes over $OUT/tests-*.xml, as JSON (zeros where none was written).
junit_counts() {
  local key total sep="" out="{"
  for key in tests failures errors skipped; do
    total=$(cat "$OUT"/tests-*.xml 2>/dev/null | grep -o "<testsuite [^>]*" | grep -o " $key=\"[0-9]*\"" \
            | grep -o "[0-9]*" | awk '{ s += $1 } END { print s + 0 }')
    out+="$sep\"$key\": $total"
    sep=", "
  done
  echo "$out}"
}

stage_build() {
  {
    git log -1 --format='commit %H %cd' 2>/dev/null || echo "commit unknown (no git)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
              'cuda', torch.version.cuda, 'triton', triton.__version__)"
  } 2>&1 | tee "$OUT/env.txt"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} "$PY" -m pip install --no-build-isolation --no-deps -e .
}

stage_backend() {
  "$PY" - <<'EOF'
import json, os, sys
import rnan_fast
info = rnan_fast.backend_info()
with open(os.path.join(os.environ["OUT"], "backend_info.json"), "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps(info))
missing = [k for k in ("extension", "extension_cuda", "triton", "cuda") if not info[k]]
if missing:
    sys.exit(f"FAILED: backend_info() has {', '.join(k + ' = False' for k in missing)} "
             f"(extension_error: {info['extension_error']}; triton_error: {info['triton_error']})")
print("backend: extension, extension_cuda, triton and cuda all available")
EOF
}

stage_tests() {
  export RNAN_FAST_AUTOTUNE=0
  local pids=() rc=0 pid
  rm -f "$OUT"/tests-*.xml "$OUT"/tests-*.log     # a previous run's groups must not be counted
  group() {   # group NAME PYTEST-ARGS...: one pytest process in the background
    local name=$1
    shift
    "$PY" -m pytest "$@" -q -p no:cacheprovider -o junit_family=xunit1 --junitxml="$OUT/tests-$name.xml" \
      > "$OUT/tests-$name.log" 2>&1 &
    pids+=($!)
  }
  # Grouped so that each holds a share of the Triton compiles (the attention tests need ~100).
  group attention tests/test_nonlocal_attention.py -k "not gpu_ and not fp32_matches_float64"
  group attention_cases tests/test_nonlocal_attention.py -k "fp32_matches_float64"
  group attention_gpu tests/test_nonlocal_attention.py -k "gpu_"
  group gate tests/test_gated_residual.py
  group model tests/test_model_gpu.py tests/test_train*.py
  group rest tests/test_backend.py tests/test_instruction_mix.py tests/test_gpu_arch.py tests/test_oom.py
  for pid in "${pids[@]}"; do
    wait "$pid" || rc=1
  done
  tail -n 3 "$OUT"/tests-*.log
  return $rc
}

stage_bench_kernels() {
  export RNAN_FAST_AUTOTUNE=1 RNAN_FAST_AUTOTUNE_MAX=${RNAN_FAST_AUTOTUNE_MAX:-2}
  local common=(-q -p no:cacheprovider --benchmark-columns=median,iqr,rounds) a=benchmarks/bench_nonlocal_attention.py
  local g=benchmarks/bench_gated_residual.py rc=0
  # P1 (bf16 forward, N = 512x768), P2 (B = 16, 48x48, fwd+bwd), P3 (memory of fwd+bwd at 512x768).
  "$PY" -m pytest "${common[@]}" --benchmark-json="$OUT/bench_attention.json" \
    "$a::test_nonlocal_attention[ours-B1-N393216-bf16-fwd]" "$a::test_nonlocal_attention[sdpa2-B1-N393216-bf16-fwd]" \
    "$a::test_nonlocal_attention[naive-B1-N393216-bf16-fwd]" "$a::test_nonlocal_attention[ours-B16-N2304-bf16-fwd+bwd]" \
    "$a::test_nonlocal_attention[naive-B16-N2304-bf16-fwd+bwd]" "$a::test_nonlocal_attention[ours-B16-N2304-fp32-fwd+bwd]" \
    "$a::test_nonlocal_attention[naive-B16-N2304-fp32-fwd+bwd]" "$a::test_nonlocal_attention[ours-B1-N393216-bf16-fwd+bwd]" \
    || rc=1
  # P4: the gate at 1x64x512x768 and at the training shape, fused vs eager (torch.compile's
  # inductor compile would cost more than the whole stage).
  "$PY" -m pytest "${common[@]}" --benchmark-json="$OUT/bench_gate.json" $(for s in 1x64x512x768 16x64x48x48; do
      for t in fp32 bf16; do for p in fwd fwd+bwd; do for v in extension eager; do
        echo "$g::test_gated_residual[$v-$s-$t-$p]"; done; done; done; done) || rc=1
  # Pass 2 with and without the polynomial exp2, same run (last: the least needed).
  "$PY" -m pytest "${common[@]}" --benchmark-json="$OUT/bench_pass2.json" "$a" -k "pass2_config and N512x768" || rc=1
  return $rc
}

stage_bench_model() {
  export RNAN_FAST_AUTOTUNE=1 RNAN_FAST_AUTOTUNE_MAX=${RNAN_FAST_AUTOTUNE_MAX:-2}
  local m=benchmarks/bench_model.py
  "$PY" -m pytest -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds --benchmark-json="$OUT/bench_model.json" \
    "$m::test_train_step[ours-bf16-graph]" "$m::test_train_step[naive-fp32-eager]" \
    "$m::test_inference[ours-bf16-512x768-whole]" "$m::test_inference[naive-fp32-200x200-whole]" \
    "$m::test_inference[ours-bf16-200x200-whole]" "$m::test_train_step[ours-bf16-eager]" \
    "$m::test_inference[ours-bf16-1024x1024-whole]"
}

export -f stage_build stage_backend stage_tests stage_bench_kernels stage_bench_model
run_stage build 120 stage_build
run_stage backend 20 stage_backend
run_stage tests 150 stage_tests
run_stage bench_kernels 120 stage_bench_kernels
run_stage bench_model 60 stage_bench_model

{
  echo "["
  sep=""
  for name in "${STAGES[@]}"; do
    printf '%s  %s' "$sep" "$(cat "$OUT/$name.json")"
    sep=$',\n'
  done
  printf '\n]\n'
} > "$OUT/summary.json"
echo "summary: $OUT/summary.json"
exit $FAILED
