# Fresh machine to results in one command: `make demo` (the main job) and `make test`.
# torch==2.13.0 is a CPU build (the CI machines have no GPU); set TORCH=... for another one, e.g.
# `make test TORCH=torch==2.14.1` for a CUDA build.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py

.PHONY: install test demo bench clean

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

demo: install
	$(VENV)/bin/purified-ops demo

clean:
	rm -rf build $(VENV) purified_ops/*.so
