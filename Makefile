# Set-up and the two main jobs. `make test` and `make bench` create .venv (torch pinned to the local CPU wheel)
# and build the extension. On a machine that already has torch (e.g. the GPU box), reuse its interpreter:
#   make test PYTHON=python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY_DEPS     ?= numpy scipy scikit-learn pytest ninja wheel rich tqdm matplotlib
MAX_JOBS    ?= 2

ifeq ($(origin PYTHON), undefined)
PYTHON      := $(VENV)/bin/python
ENV_STAMP   := $(VENV)/.deps-stamp
else
ENV_STAMP   :=
endif

BUILD_STAMP := build/.vqk-installed
SOURCES     := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py

.PHONY: all build test bench info lint clean

all: test

$(VENV)/.deps-stamp:
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install -q $(TORCH_SPEC) $(PY_DEPS)
	touch $@

$(BUILD_STAMP): $(ENV_STAMP) $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

build: $(BUILD_STAMP)

test: build
	$(PYTHON) -m vqkernels.info
	$(PYTHON) -m pytest tests -q

bench: build
	$(PYTHON) -m vqkernels.bench

info: build
	$(PYTHON) -m vqkernels.info

lint:
	$(PYTHON) -m ruff check vqkernels tests benchmarks

clean:
	rm -rf build *.egg-info vqkernels/_C*.so
