#!/usr/bin/env bash
# The CPU benchmarks behind the speed tables (README, docs/performance.md, benchmarks/README.md), all providers interleaved in one process per
# sweep, the copy bandwidth (torch.add out=) measured alongside, the load average in every row:
#   step:  the training step (forward + backward) that users run, against its speed goals: the
#          public step, the kernels alone and torch.compile, float32 and bfloat16, N 2048 and 8192, K 1 and 4
#          (preset cpu-step) -> benchmarks/results/cpu_step.csv, cpu_step.png, cpu_step.md (the
#          table against its goals). ~2 minutes on 2 cores.
#   sweep: purify against the eager formula and torch.compile over sizes -> cpu.csv (upserted),
#          the plots, cpu_summary.md (the CPU speed targets). ~5 minutes on 2 cores.
# Usage: benchmarks/run_cpu.sh [step|sweep|all]  (default all). Run it on a quiet machine: with
# other processes on its cores, a 2-thread step waits for a descheduled thread (benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RESULTS=benchmarks/results
quiet() { "$@" 2> >(grep -v USDT >&2); }

step() {
  local csv=$RESULTS/cpu_step.csv
  quiet "$PY" -m purified_ops bench --device cpu --preset cpu-step --providers purified_ops purified_ops_kernel compile \
    --csv "$csv"
  "$PY" benchmarks/plot.py --step "$csv"
  "$PY" benchmarks/summarize.py --step "$csv" | tee $RESULTS/cpu_step.md
}

sweep() {
  local csv=$RESULTS/cpu.csv
  bench() { quiet "$PY" -m purified_ops bench --device cpu --reps "${REPS:-30}" --csv "$csv" "$@"; }
  # Both sides of the last-level cache (8 MiB here): 256 x 1024 float32 is 1 MiB per tensor.
  bench --dtypes float32 --N 256 2048 8192 --D 1024 --K 1 4 --modes forward backward full
  bench --dtypes float32 --N 1024 --D 1024 --K 4 --modes forward backward full
  bench --dtypes float32 --N 2048 --D 256 4096 --K 1 4 --modes forward full
  bench --dtypes bfloat16 --N 2048 8192 --D 1024 --K 1 --modes forward full
  "$PY" benchmarks/plot.py "$csv"
  "$PY" benchmarks/summarize.py "$csv" | tee $RESULTS/cpu_summary.md
}

case "${1:-all}" in
  step) step ;;
  sweep) sweep ;;
  all) step; sweep ;;
  *) echo "usage: $0 [step|sweep|all]" >&2; exit 2 ;;
esac
