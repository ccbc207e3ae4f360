#!/usr/bin/env bash
# The one prepared GPU check (H100/H200, sm_90), unattended in one call of at most 10 minutes:
#   1. build the extension for sm_90 only (MAX_JOBS=16), ptxas report -> ptxas_sm90.txt
#   2. `purified-ops verify --device all`: every backend here (CPU, CUDA) and every gradient against
#      the float64 reference, gradcheck, opcheck, determinism (capped at 150 s) -> gpu_verify.log
#   3. the CUDA tests (tests/test_cuda.py and every test's cuda parametrization)
#   4. the CUDA benchmark (`python -m purified_ops bench --preset cuda`, purified_ops/bench.py) with
#      the time that is left: rows are upserted into benchmarks/results/cuda.csv (and $OUT/cuda.csv)
#      after every case, so a run cut short still leaves its numbers
#   5. the GPU model's prediction beside every measured row (benchmarks/gpu_model.py --compare:
#      benchmarks/results/gpu_model.json, the GPU the row names) and measured / predicted
# Logs go to $OUT (else benchmarks/results/). A failing step never stops the next.
# Expected on an H100 host (16 cores): build ~1-2 min, verify (capped at 150 s), tests ~1-3 min
# (capped at 180 s), the benchmark the rest: ~8 torch.compile graphs (dynamic shapes) at 10-40 s
# each, then ~2-5 s a case.
# Usage: bash benchmarks/gpu_check.sh        (PYTHON=python3 by default)
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=${GPU_CHECK_DEADLINE_S:-540}   # the script ends by then: a caller with a 10-minute limit keeps ~1 min to collect the results
PY=${PYTHON:-python3}
RES=benchmarks/results
mkdir -p "$RES"
LOGDIR=${OUT:-$RES}
mkdir -p "$LOGDIR"
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( DEADLINE - $(elapsed) )); }
say() { echo "[gpu_check $(elapsed)s] $*"; }

say "host $(hostname); $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | head -2)"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0))" 2>&1

# 1. build (sm_90 only: one compile of each .cu, in parallel)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || export CUDA_HOME=/usr/local/cuda-13.0
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} PURIFIED_OPS_CUDA=1 PURIFIED_OPS_PTXAS_VERBOSE=1
say "building (nvcc $(nvcc --version | grep -o 'release [0-9.]*'))"
timeout 300 $PY setup.py build_ext --inplace > "$LOGDIR/gpu_build.log" 2>&1
BUILD_RC=$?
say "build rc=$BUILD_RC"
tail -3 "$LOGDIR/gpu_build.log"
$PY scripts/ptxas_summary.py < "$LOGDIR/gpu_build.log" > "$LOGDIR/ptxas_sm90_gpu.txt"
tail -1 "$LOGDIR/ptxas_sm90_gpu.txt"
if [ $BUILD_RC -ne 0 ]; then
  grep -E "error" "$LOGDIR/gpu_build.log" | head -20
  say "build failed: nothing to test"
  exit 1
fi
$PY -c "import purified_ops, torch; print('backends', purified_ops.available_backends())"

# 2. verify (bounded; a failing check is named in the log and never stops the next steps)
say "verify (timeout 150s)"
timeout 150 $PY -m purified_ops verify --device all --json > "$LOGDIR/gpu_verify.log" 2> "$LOGDIR/gpu_verify.err"
VERIFY_RC=$?
grep -E "^(FAILED|verify:)" "$LOGDIR/gpu_verify.log" | head -30
[ $VERIFY_RC -ne 0 ] && tail -5 "$LOGDIR/gpu_verify.err"
say "verify rc=$VERIFY_RC"

# 3. tests on the GPU (bounded; the benchmark runs whatever happens here)
T=$(( $(left) - 200 )); [ $T -gt 180 ] && T=180; [ $T -lt 30 ] && T=30
say "CUDA tests (timeout ${T}s)"
timeout $T $PY -m pytest tests -q -k "cuda" -p no:cacheprovider --maxfail=20 --durations=15 > "$LOGDIR/gpu_tests.log" 2>&1
TEST_RC=$?
grep -E "passed|failed|error" "$LOGDIR/gpu_tests.log" | tail -3
[ $TEST_RC -ne 0 ] && grep -E "^(FAILED|ERROR)|Error|assert" "$LOGDIR/gpu_tests.log" | head -30
say "tests rc=$TEST_RC"

# 4. benchmark with the time left: no case starts after the budget; the hard limit ends a case
# that runs over (a long compile) before DEADLINE, its earlier rows already written
B=$(( $(left) - 60 )); [ $B -lt 30 ] && B=30
HARD=$(( $(left) - 5 )); [ $HARD -lt 40 ] && HARD=40
say "benchmark (budget ${B}s, hard limit ${HARD}s)"
timeout -k 5 $HARD $PY -m purified_ops bench --device cuda --preset cuda --budget-s "$B" \
  --csv "$RES/cuda.csv" ${OUT:+"$OUT/cuda.csv"} > "$LOGDIR/gpu_bench.log" 2>&1
BENCH_RC=$?
grep -vE "^(W|I)[0-9]{4}" "$LOGDIR/gpu_bench.log" | tail -40

# 5. the model against the measurement: where the ratio is far from 1, the model or the kernel is wrong
say "measured beside the GPU model's prediction"
[ -f "$RES/cuda.csv" ] && $PY benchmarks/gpu_model.py --compare "$RES/cuda.csv" | tee "$LOGDIR/gpu_model_check.txt"
say "bench rc=$BENCH_RC; done in $(elapsed)s (build $BUILD_RC, verify $VERIFY_RC, tests $TEST_RC, bench $BENCH_RC)"
