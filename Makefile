# Fresh machine to results in one command: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py

.PHONY: install test demo bench clean

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -r requirements.txt
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
