#!/usr/bin/env bash
# CI check of what users install: `python -m build` makes the sdist and, from the unpacked sdist,
# the wheel (so a file missing from the sdist fails here); the wheel goes into a fresh venv apart
# from the checkout (the same torch from disk or pip's cache, the wheel with --no-deps), where
# scripts/check_install.py checks the fused kernels: on this CPU, then under qemu-x86_64 as an
# AVX2-only CPU (Haswell) and as one without AVX (Nehalem), each of which must get its own kernels;
# and `purified-ops verify --quick` runs from the installed wheel.
# The build runs without isolation (`--no-isolation`): the extension must be compiled against the
# torch it will run with, not one pip fetches into an isolated environment.
# Usage: bash scripts/check_dist.sh [PYTHON]   (default .venv/bin/python, with torch and the
# build requirements of pyproject.toml and its `dist` extra installed: `make install` does that)
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${1:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, the venv's link kept
REPO=$(pwd)
step() { echo "[check_dist $(( $(date +%s) - START ))s] $*"; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' purified_ops/__init__.py)
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
step "python -m build --no-isolation (purified-ops $VERSION, torch $TORCH_VERSION)"
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m build --no-isolation --outdir "$WORK/dist" . > "$WORK/build.log" 2>&1 ||
  { tail -40 "$WORK/build.log"; grep -E "error" "$WORK/build.log" | head -20; exit 1; }
SDIST="$WORK/dist/purified_ops-$VERSION.tar.gz"
WHEEL=$(ls "$WORK"/dist/purified_ops-"$VERSION"-*.whl)
ls -l "$SDIST" "$WHEEL"

step "fresh venv: torch==$TORCH_VERSION, numpy and the wheel"
BASE_PY=$("$PY" -c 'import sys; print(sys._base_executable)')
"$BASE_PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet "torch==$TORCH_VERSION" numpy
"$VPY" -m pip install --quiet --no-deps "$WHEEL"

cd "$WORK"  # not the checkout: the installed package is the one imported
check() {  # check [qemu-x86_64 -cpu MODEL] EXPECTED_CAPABILITY
  local cap=${*: -1} t0
  t0=$(date +%s)
  "${@:1:$#-1}" "$VPY" "$REPO/scripts/check_install.py" --capability "$cap" | tee "$WORK/check.out"
  grep -q "from $WORK/venv/" "$WORK/check.out" || { echo "check_dist: not the installed package"; exit 1; }
  step "$cap kernels OK ($(( $(date +%s) - t0 ))s)"
}
NATIVE=$("$VPY" -c 'from purified_ops._extension import torch_cpu_capability; print(torch_cpu_capability())')
step "check on this CPU (torch chose $NATIVE)"
check "$NATIVE"
step "purified-ops verify --quick from the installed wheel"
"$WORK/venv/bin/purified-ops" verify --quick --device cpu > "$WORK/verify.out" || { cat "$WORK/verify.out"; exit 1; }
tail -n 2 "$WORK/verify.out" | head -n 1
if [ "$(uname -m)" = x86_64 ]; then
  command -v qemu-x86_64 > /dev/null ||
    { echo "check_dist: qemu-x86_64 not found (apt-get install -y qemu-user)"; exit 1; }
  step "check under $(qemu-x86_64 --version | head -1) -cpu Haswell (AVX2, no AVX-512)"
  check qemu-x86_64 -cpu Haswell AVX2
  step "check under qemu-x86_64 -cpu Nehalem (no AVX)"
  check qemu-x86_64 -cpu Nehalem DEFAULT
fi
step "OK in $(( $(date +%s) - START ))s"
