# Fresh machine to results in one command: `make demo` (the main job) and `make test`.
# torch==2.13.0 is a CPU build (the CI machines have no GPU); set TORCH=... for another one, e.g.
# `make test TORCH=torch==2.14.1` for a CUDA build.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py

.PHONY: install test demo bench clean test-cuda-emu

# The requirements are listed once, in pyproject.toml: what the build needs (it runs without
# isolation), the package's own, and the extras.
$(VENV)/.deps: pyproject.toml scripts/requirements.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) scripts/requirements.py build run test bench demo dist > $(VENV)/requirements.txt
	$(PY) -m pip install --quiet "$(TORCH)" -r $(VENV)/requirements.txt
	touch $@

# Rebuilt whenever a C++/CUDA source changes (an editable install compiles only once).
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

test: install
	$(PY) -m pytest tests -q

# The CUDA kernels emulated on the CPU (docs/cuda_emulation.md): every test with an
# emulated case (`make test` runs before this build, so it skips them), `purified-ops verify` over
# the emulated backend (its quick matrix: tests/test_cuda.py covers the K buckets and layouts), a
# subset under AddressSanitizer and UBSan, and the check that planted bugs are caught.
CUDA_EMU_ASAN_TESTS := emulated and (broadcast_patterns or offset or vector_path and float32 or empty or large_k \
	or inputs_are_not_written or arguments or schedules or broadcast_z_shared and 512-4- \
	or large_directions and rows and not long and float32 or pivoting and float32 \
	or shapes_k_buckets_and_tiles and (-7- or -1000- or -4100-) and (-1- or -4- or -16-) and (float32 or float16))
test-cuda-emu: install
	PURIFIED_OPS_CUDA_EMU=1 $(PY) setup.py build_ext --inplace -q
	$(PY) -m pytest tests -q -k emulated
	$(VENV)/bin/purified-ops verify --device cpu --quick
	PURIFIED_OPS_CUDA_EMU=asan $(PY) setup.py build_ext --inplace -q
	scripts/with_asan $(PY) -m pytest tests/test_cuda.py -q -p no:cacheprovider -k "$(CUDA_EMU_ASAN_TESTS)"
	$(PY) scripts/cuda_emu_sensitivity.py

demo: install
	$(VENV)/bin/purified-ops demo

clean:
	rm -rf build $(VENV) purified_ops/*.so
