# Set-up and the two main jobs. `make test` and `make bench` create .venv (torch pinned to the local CPU wheel)
# and build the extension. On a machine that already has torch (e.g. the GPU box), reuse its interpreter:
#   make test PYTHON=python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY_DEPS     ?= numpy scipy scikit-learn pytest ninja wheel rich tqdm matplotlib triton==3.9.0
MAX_JOBS    ?= 2
# Optional baselines of the layer benchmark; a failed install only drops their rows.
BENCH_DEPS  ?= vector-quantize-pytorch
BENCH_OUT   ?= build/bench

ifeq ($(origin PYTHON), undefined)
PYTHON      := $(VENV)/bin/python
ENV_STAMP   := $(VENV)/.deps-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
else
ENV_STAMP   :=
BENCH_STAMP :=
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

$(VENV)/.bench-stamp: $(VENV)/.deps-stamp
	-$(VENV)/bin/python -m pip install -q $(TORCH_SPEC) $(BENCH_DEPS) || echo "note: $(BENCH_DEPS) not installed; its benchmark rows are skipped"
	touch $@

$(BUILD_STAMP): $(ENV_STAMP) $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

build: $(BUILD_STAMP)

test: build
	$(PYTHON) -m vqkernels.info
	$(PYTHON) -m pytest tests -q

bench: build $(BENCH_STAMP)
	mkdir -p $(BENCH_OUT)
	$(PYTHON) -m vqkernels.bench --json $(BENCH_OUT)/ops.json
	$(PYTHON) -m vqkernels.bench_layer --json $(BENCH_OUT)/layer.json

info: build
	$(PYTHON) -m vqkernels.info

lint:
	$(PYTHON) -m ruff check vqkernels tests benchmarks

clean:
	rm -rf build *.egg-info vqkernels/_C*.so
