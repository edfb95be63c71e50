# Set-up and the two main jobs. `make test` and `make bench` create .venv (torch pinned to the local CPU wheel)
# and build the extension. On a machine that already has torch (e.g. the GPU box), reuse its interpreter:
#   make test PYTHON=python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
RUFF_SPEC   ?= ruff==0.17.6
PY_DEPS     ?= numpy scipy scikit-learn pytest pytest-benchmark ninja wheel rich tqdm matplotlib triton==3.9.0 $(RUFF_SPEC)
MAX_JOBS    ?= 2
# Optional: the layer benchmark's baseline rows and the parity tests of VectorQuantize against the real library; a
# failed install only drops those rows and skips those tests (each says why).
BENCH_DEPS  ?= vector-quantize-pytorch==1.32.0
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

.PHONY: all build test bench bench-suite demo info lint format clean cpu-check neon-check cuda-check \
	gpu-compile-check gpu-compile-check-compat gpu-check

all: test

$(VENV)/.deps-stamp:
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install -q $(TORCH_SPEC) $(PY_DEPS)
	-$(VENV)/bin/python -m pip install -q $(TORCH_SPEC) $(BENCH_DEPS) || echo "note: $(BENCH_DEPS) not installed; its benchmark rows and parity tests are skipped"
	touch $@

$(VENV)/.bench-stamp: $(VENV)/.deps-stamp
	touch $@

$(BUILD_STAMP): $(ENV_STAMP) $(SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

build: $(BUILD_STAMP)

# Compile every .cu file for each arch (objects only, warnings are errors, ptxas spills are warnings too, and the
# half-conversion macros a torch build defines): runs without a GPU or a CUDA torch.
CUDA_CHECK_FLAGS ?= -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -D__CUDA_NO_HALF2_OPERATORS__ -Xptxas --warn-on-spills
cuda-check:
ifeq ($(NVCC),)
	@echo "cuda-check: nvcc not found, skipped"
else
	@mkdir -p build/cuda-check
	@for arch in $(CUDA_ARCHS); do for f in $(CU_SOURCES); do \
	  echo "nvcc sm_$$arch $$f"; \
	  $(NVCC) -std=c++17 -O3 -arch=sm_$$arch -Werror all-warnings -Xcompiler -Wall,-Wextra $(CUDA_CHECK_FLAGS) \
	    -c $$f -o build/cuda-check/$$(basename $$f .cu).sm_$$arch.o || exit 1; \
	done; done
endif

# Compile every C++ source of the CPU ops with warnings as errors (torch's and Python's headers as system headers,
# whose warnings are not ours), at -O2 so that the flow-sensitive warnings run; the build itself only warns.
CPP_CHECK_SOURCES := $(wildcard csrc/*.cpp csrc/cpu/*.cpp)
cpu-check: $(ENV_STAMP)
	@mkdir -p build/cpu-check
	@flags="$$($(PYTHON) -c "import re, sysconfig, torch; from torch.utils.cpp_extension import include_paths; \
	  std = 'c++20' if tuple(map(int, re.match(r'(\d+)\.(\d+)', torch.__version__).groups())) >= (2, 14) else 'c++17'; \
	  print('-std=' + std, *('-isystem' + p for p in include_paths() + [sysconfig.get_paths()['include']]))")"; \
	printf '%s\n' $(CPP_CHECK_SOURCES) | xargs -P $(MAX_JOBS) -I{} sh -c \
	  'echo "g++ -Werror {}"; g++ '"$$flags"' -O2 -fopenmp -Wall -Wextra -Werror -DTORCH_EXTENSION_NAME=_C \
	   -c {} -o build/cpu-check/$$(basename {} .cpp).o' || exit 1

# The NEON epilogues compile only on aarch64: compile-check them with Debian's cross compiler
# (g++-aarch64-linux-gnu), which .ci/run installs when it is missing; without it the check says so and passes.
AARCH64_CXX ?= $(shell command -v aarch64-linux-gnu-g++ 2>/dev/null)
neon-check:
ifeq ($(AARCH64_CXX),)
	@echo "neon-check: aarch64-linux-gnu-g++ not found (apt-get install g++-aarch64-linux-gnu), skipped"
else
	@mkdir -p build/neon-check
	$(AARCH64_CXX) -std=c++17 -O2 -Wall -Wextra -Werror -c csrc/cpu/epilogues_neon.cpp -o build/neon-check/epilogues_neon.o
	@nm build/neon-check/epilogues_neon.o | grep -q argmin_codes_neon || { echo "neon-check: no NEON kernel compiled"; exit 1; }
endif

# Compile every Triton variant the launchers request for sm_80 and sm_90 (no GPU: a stand-in driver, an empty
# cache); fails on a compile error, shared memory over the limit, > 255 registers or a spill.
GPU_COMPILE_OUT ?= build/gpu-compile
gpu-compile-check: build
	@mkdir -p $(GPU_COMPILE_OUT)
	env -u TRITON_INTERPRET $(PYTHON) -m vqkernels.triton.gpu_compile --arch 80 90 \
	  --json $(GPU_COMPILE_OUT)/triton-venv.json

# The same against the triton of the lendable GPU machine, installed into a side folder (no second venv).
TRITON_COMPAT     ?= 3.6.0
TRITON_COMPAT_DIR ?= build/triton-$(TRITON_COMPAT)
$(TRITON_COMPAT_DIR)/.stamp:
	rm -rf $(TRITON_COMPAT_DIR)
	$(PYTHON) -m pip install -q --no-deps --target $(TRITON_COMPAT_DIR) triton==$(TRITON_COMPAT)
	touch $@

gpu-compile-check-compat: build $(TRITON_COMPAT_DIR)/.stamp
	@mkdir -p $(GPU_COMPILE_OUT)
	env -u TRITON_INTERPRET PYTHONPATH=$(abspath $(TRITON_COMPAT_DIR)) $(PYTHON) -m vqkernels.triton.gpu_compile \
	  --arch 80 90 --json $(GPU_COMPILE_OUT)/triton-$(TRITON_COMPAT).json

test: build cpu-check neon-check cuda-check gpu-compile-check
	$(PYTHON) -m vqkernels.info
	$(PYTHON) -m pytest tests -q

# On a lent GPU machine (its own python3: torch with CUDA, triton, pytest): build for the local arch, the GPU test
# matrix, the GPU benchmark; logs and JSON under OUT; stops at its own time limit (GPU_CHECK_BUDGET seconds).
# Without a visible GPU it says so and exits non-zero.
OUT              ?= build/gpu-check
GPU_CHECK_BUDGET ?= 450
GPU_PYTHON       := $(if $(filter undefined,$(origin PYTHON)),python3,$(PYTHON))
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out $(OUT) --budget $(GPU_CHECK_BUDGET) --python $(GPU_PYTHON)

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

# ruff (pinned in RUFF_SPEC; the same version as .pre-commit-config.yaml): lint and formatting, run by .ci/run.
LINT_PATHS ?= vqkernels tests benchmarks setup.py
lint: $(ENV_STAMP)
	$(PYTHON) -m ruff check $(LINT_PATHS)
	$(PYTHON) -m ruff format --check $(LINT_PATHS)

format: $(ENV_STAMP)
	$(PYTHON) -m ruff check --fix $(LINT_PATHS)
	$(PYTHON) -m ruff format $(LINT_PATHS)

clean:
	rm -rf build *.egg-info vqkernels/_C*.so

# ---- cuda-ext-check (issue 13) -------------------------------------------------------------------------------------
# vqkernels._C WITH its CUDA ops, built against a CUDA build of torch, and checked without a GPU. A separate venv
# ($(CUDA_VENV), torch pinned on every pip call) builds the extension out of tree: `setup.py build` writes a full
# package copy to $(CUDA_EXT_BUILD)/lib, so the CPU build in vqkernels/_C*.so is untouched. Then
# tests/cuda_ext/check_cuda_ext.py runs from $(CUDA_EXT_BUILD) (where the source vqkernels/ cannot shadow the
# copy) with that copy first on PYTHONPATH. Rebuilds only when csrc/, setup.py or a vqkernels/*.py file changes.
CUDA_VENV       ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_PY_DEPS    ?= numpy pytest ninja wheel setuptools
CUDA_EXT_ARCHS  ?= 8.0;9.0
CUDA_EXT_BUILD  ?= build/cuda-ext
CUDA_EXT_JOBS   ?= $(MAX_JOBS)
# CUDA_HOME from the environment, else the toolkit of the nvcc on PATH: dirname(dirname(nvcc)) when it holds
# include/cuda_runtime.h, else the TOP that nvcc itself reports (nvcc may be a wrapper script in /usr/local/bin).
CUDA_EXT_HOME   ?= $(or $(CUDA_HOME),$(shell n=$$(command -v nvcc) || exit 0; d=$$(dirname "$$(dirname "$$n")"); \
  if [ -e "$$d/include/cuda_runtime.h" ]; then echo "$$d"; else \
  t=$$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/.*TOP=//p' | head -n 1); \
  [ -n "$$t" ] && (cd "$$t" && pwd -P); fi))
CUDA_EXT_PY     = $(shell find vqkernels -name '*.py')
CUDA_EXT_STAMP  := $(CUDA_EXT_BUILD)/.built-stamp

.PHONY: cuda-ext-check cuda-ext-build

$(CUDA_VENV)/.cuda-deps-stamp:
	python3 -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q $(CUDA_TORCH_SPEC) $(CUDA_PY_DEPS)
	$(CUDA_VENV)/bin/python -c "import torch; assert torch.version.cuda, torch.__version__; print('cuda venv: torch', torch.__version__, 'CUDA', torch.version.cuda)"
	touch $@

$(CUDA_EXT_STAMP): $(CUDA_VENV)/.cuda-deps-stamp $(SOURCES) $(CUDA_EXT_PY)
	@test -n "$(CUDA_EXT_HOME)" || { echo "cuda-ext-check: no CUDA toolkit (set CUDA_HOME or put nvcc on PATH)"; exit 1; }
	mkdir -p $(CUDA_EXT_BUILD)
	@# the copy's .py files are copied afresh (a file removed from vqkernels/ leaves the copy too); _C*.so stays
	-find $(CUDA_EXT_BUILD)/lib -name '*.py' -delete 2>/dev/null
	VQK_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_EXT_ARCHS)" MAX_JOBS=$(CUDA_EXT_JOBS) CUDA_HOME="$(CUDA_EXT_HOME)" \
	  $(CUDA_VENV)/bin/python setup.py -q egg_info --egg-base $(CUDA_EXT_BUILD) \
	  build --build-base $(CUDA_EXT_BUILD) --build-lib $(CUDA_EXT_BUILD)/lib
	touch $@

cuda-ext-build: $(CUDA_EXT_STAMP)

cuda-ext-check: $(CUDA_EXT_STAMP)
	cd $(CUDA_EXT_BUILD) && PYTHONPATH="$(abspath $(CUDA_EXT_BUILD)/lib)" VQK_CUDA_EXT_LIB="$(abspath $(CUDA_EXT_BUILD)/lib)" \
	  VQK_CUDA_EXT_ARCHS="$(CUDA_EXT_ARCHS)" \
	  $(abspath $(CUDA_VENV))/bin/python -m pytest -q -p no:cacheprovider --confcutdir="$(abspath tests/cuda_ext)" \
	  --rootdir="$(abspath tests/cuda_ext)" -c /dev/null "$(abspath tests/cuda_ext/check_cuda_ext.py)"
# ---- end cuda-ext-check ----------------------------------------------------------------------------------------------
