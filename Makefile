# Set-up and the two main jobs. `make test` and `make bench` create .venv (torch pinned to the local CPU wheel)
# and build the extension. On a machine that already has torch (e.g. the GPU box), reuse its interpreter:
#   make test PYTHON=python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY_DEPS     ?= numpy scipy scikit-learn pytest pytest-benchmark ninja wheel rich tqdm matplotlib triton==3.9.0
MAX_JOBS    ?= 2
# Optional baselines of the layer benchmark; a failed install only drops their rows.
BENCH_DEPS  ?= vector-quantize-pytorch
BENCH_OUT   ?= build/bench
DEMO_OUT    ?= build/demo

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

NVCC        ?= $(shell command -v nvcc 2>/dev/null)
CUDA_ARCHS  ?= 80 90
CU_SOURCES  := $(wildcard csrc/cuda/*.cu)

.PHONY: all build test bench bench-suite demo info lint clean cuda-check

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

# Compile every .cu file for each arch (objects only, warnings are errors): runs without a GPU or a CUDA torch.
cuda-check:
ifeq ($(NVCC),)
	@echo "cuda-check: nvcc not found, skipped"
else
	@mkdir -p build/cuda-check
	@for arch in $(CUDA_ARCHS); do for f in $(CU_SOURCES); do \
	  echo "nvcc sm_$$arch $$f"; \
	  $(NVCC) -std=c++17 -O3 -arch=sm_$$arch -Werror all-warnings -Xcompiler -Wall,-Wextra \
	    -c $$f -o build/cuda-check/$$(basename $$f .cu).sm_$$arch.o || exit 1; \
	done; done
endif

test: build cuda-check
	$(PYTHON) -m vqkernels.info
	$(PYTHON) -m pytest tests -q

bench: build $(BENCH_STAMP)
	mkdir -p $(BENCH_OUT)
	$(PYTHON) -m vqkernels.bench --json $(BENCH_OUT)/ops.json
	$(PYTHON) -m vqkernels.bench_layer --json $(BENCH_OUT)/layer.json

# The same cases as pytest-benchmark suites (one group per shape, dtype and metric).
bench-suite: build $(BENCH_STAMP)
	$(PYTHON) -m pytest benchmarks --benchmark-only

demo: build
	mkdir -p $(DEMO_OUT)
	$(PYTHON) -m vqkernels.demo --json $(DEMO_OUT)/demo.json --plot $(DEMO_OUT)/demo.png

info: build
	$(PYTHON) -m vqkernels.info

lint:
	$(PYTHON) -m ruff check vqkernels tests benchmarks

clean:
	rm -rf build *.egg-info vqkernels/_C*.so
