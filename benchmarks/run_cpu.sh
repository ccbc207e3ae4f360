#!/usr/bin/env bash
# The CPU benchmark behind the README's table: purify against the eager formula and
# torch.compile of it, all providers interleaved in one process per sweep, the copy bandwidth
# (torch.add out=) measured alongside. Writes benchmarks/results/cpu.csv (upserted), the plots,
# and cpu_summary.md (the CPU speed targets). Run it on a quiet machine: ~5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CSV=benchmarks/results/cpu.csv
bench() { "$PY" -m purified_ops bench --device cpu --reps "${REPS:-30}" --csv "$CSV" "$@" 2> >(grep -v USDT >&2); }
# Both sides of the last-level cache (8 MiB here): 256 x 1024 float32 is 1 MiB per tensor.
bench --dtypes float32 --N 256 2048 8192 --D 1024 --K 1 4 --modes forward backward full
bench --dtypes float32 --N 1024 --D 1024 --K 4 --modes forward backward full
bench --dtypes float32 --N 2048 --D 256 4096 --K 1 4 --modes forward full
bench --dtypes bfloat16 --N 2048 8192 --D 1024 --K 1 --modes forward full
"$PY" benchmarks/plot.py "$CSV"
"$PY" benchmarks/summarize.py "$CSV" | tee benchmarks/results/cpu_summary.md
