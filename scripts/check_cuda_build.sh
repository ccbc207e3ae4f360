#!/usr/bin/env bash
# CI check of the CUDA build on a GPU-less machine: a venv with the CUDA 13.0 build of torch,
# the extension built with nvcc for the default archs (TORCH_CUDA_ARCH_LIST unset: every arch
# torch was built for and setup.py's minimum ones, PTX of the newest), the ptxas report of every
# arch built (fails if a kernel spills on any, or an arch is missing from it), the cubins and PTX
# the built extension carries (scripts/cuda_images.py; tests/test_cuda_archs.py checks them
# against torch's arch list), the CUDA kernels registered, verify and the API tests (CUDA tests
# skip, CPU tests pass). It builds in a copy of the tracked files, so the checkout's own (CPU)
# build is left alone.
# Usage: bash scripts/check_cuda_build.sh [VENV_DIR]   (default .venv-cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
VENV=${1:-.venv-cuda}
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
export PATH="$CUDA_HOME/bin:$PATH"
step() { echo "[check_cuda_build $(( $(date +%s) - START ))s] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  $PY -m venv "$VENV"
fi
step "installing torch==2.14.1 and the requirements (pyproject.toml)"
"$VENV/bin/python" scripts/requirements.py build run test bench demo > "$VENV/requirements.txt"
"$VENV/bin/python" -m pip install --quiet torch==2.14.1 -r "$VENV/requirements.txt"

REPO=$(pwd)
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$SRC"
cd "$SRC"
VENV=$(cd "$REPO" && realpath "$VENV")
step "building in $SRC (nvcc $(nvcc --version | grep -o 'release [0-9.]*'), the default archs; load average $(cut -d' ' -f1-3 /proc/loadavg))"
LOG=$(mktemp)
trap 'rm -rf "$SRC" "$LOG"' EXIT
BUILD_START=$(date +%s)
env -u TORCH_CUDA_ARCH_LIST PURIFIED_OPS_CUDA=1 PURIFIED_OPS_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-2} \
  "$VENV/bin/python" setup.py build_ext --inplace > "$LOG" 2>&1 || { tail -40 "$LOG"; grep -E "error" "$LOG" | head -20; exit 1; }
grep "purified_ops: CUDA kernels for" "$LOG"
step "built in $(( $(date +%s) - BUILD_START ))s (load average $(cut -d' ' -f1-3 /proc/loadavg))"
IMAGES=$("$VENV/bin/python" -c 'import purified_ops; print(purified_ops.build_info()["cuda_archs"])')
step "GPU code in the extension (scripts/cuda_images.py; build info: $IMAGES)"
"$VENV/bin/python" scripts/cuda_images.py purified_ops/_C*.so --expect "$IMAGES" | tr '\n' ' '; echo
step "ptxas report"
SPILL_RC=0
"$VENV/bin/python" scripts/ptxas_summary.py --archs "$IMAGES" < "$LOG" || SPILL_RC=$?

step "registration"
"$VENV/bin/python" - <<'PYEOF'
import torch
import purified_ops
info = purified_ops.build_info()
assert info["extension_loaded"] and info["cuda"], info
for op in ("purify_forward", "purify_backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"purified_ops::{op}", key), (op, key)
print("purified_ops:", info["cuda_archs"], "| CUDA and CPU kernels registered | backends", purified_ops.available_backends())
PYEOF

# The whole suite runs in `make test`; here, with the newer torch of this build, the kernels'
# check (verify), the API and autograd tests, and the images against torch's arch list (-rs: a
# skipped check says why).
step "verify and API tests with torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
"$VENV/bin/python" -m purified_ops verify --quick --device cpu
env -u TORCH_CUDA_ARCH_LIST CUDA_HOME="$CUDA_HOME" "$VENV/bin/python" -m pytest tests/test_api.py \
  tests/test_autograd.py tests/test_workflows.py tests/test_cuda_archs.py -q -rs -p no:cacheprovider

if [ "$SPILL_RC" -ne 0 ]; then
  step "FAILED: a kernel spills registers, or an arch built is missing from the ptxas report (see above)"
  exit 1
fi
step "OK in $(( $(date +%s) - START ))s"
