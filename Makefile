# `make demo` and `make test` work on a fresh machine: each sets up .venv (torch if missing,
# the dev requirements, an editable build of the extension) before it runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
NVCC ?= $(shell command -v nvcc 2>/dev/null)
NVCC_ARCH ?= -gencode arch=compute_90,code=sm_90
DEMO_OUT ?= demo_out
# torchvision and timm get a venv of their own layered on the main one (see requirements-vision.txt)
VISION_VENV ?= .venv-vision
VISION_PY := $(VISION_VENV)/bin/python

.PHONY: setup lint setup-vision test demo demo-vit bench bench-report check-cuda check-ext check-install gpu-check gpu-wheels clean

$(VENV)/.stamp: setup.py pyproject.toml tools/build_backend.py requirements-dev.txt $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e ".[ray]"
	touch $@

setup: $(VENV)/.stamp

# The vision venv sees the main venv's packages (torch, transformers, eeruntime's editable
# install) through a .pth file that adds its site-packages; only torchvision and timm are its own.
$(VISION_VENV)/.stamp: $(VENV)/.stamp requirements-vision.txt
	test -x $(VISION_PY) || $(PYTHON) -m venv $(VISION_VENV)
	$(PY) -c "import site; print('import site; site.addsitedir(%r)' % site.getsitepackages()[0])" > \
	  "$$($(VISION_PY) -c 'import site; print(site.getsitepackages()[0])')/_eeruntime_main_venv.pth"
	$(VISION_PY) -m pip install -q --no-deps -r requirements-vision.txt
	$(VISION_PY) -c "import torch, sys; sys.exit(0 if torch.__file__.startswith('$(abspath $(VENV))') else 'the vision venv must use the main venv torch, got ' + torch.__file__)"
	touch $@

setup-vision: $(VISION_VENV)/.stamp

# Compile every CUDA source on its own with nvcc (no torch headers), and check that the CUDA
# binding compiles against torch's and the toolkit's headers, so CUDA code that does not compile
# cannot land even on machines without a GPU.
check-cuda: setup
ifneq ($(NVCC),)
	@for f in $(wildcard csrc/cuda/*.cu); do \
	  echo "nvcc -c $$f"; \
	  $(NVCC) -std=c++17 -O2 $(NVCC_ARCH) --expt-relaxed-constexpr -c $$f -o /tmp/eeruntime_$$(basename $$f).o || exit 1; \
	done
	$(PY) tools/check_cuda_binding.py $(NVCC)
else
	@echo "check-cuda: nvcc not found, CUDA sources not compiled"
endif

# The tests must exercise the compiled ops: a C++ build that failed (setup.py then falls back to
# the torch references) fails here instead of skipping every extension test.
check-ext: setup
	@$(PY) -c "from eeruntime import _ext; import sys; sys.exit(0 if _ext.available() else 'eeruntime._C did not build or load: ' + str(_ext.why_unavailable()) + '; see the pip output of: $(PY) -m pip install -v --no-build-isolation -e .')"

# A user's install: the sdist, `pip install`ed (not editable, pip's build isolation on) into a fresh
# venv that already has torch; torch must stay as it was and the compiled ops must load
# (tools/check_install.py). Minutes: it installs torch into the venv and compiles the extension.
check-install: setup
	$(PY) tools/check_install.py --torch "$(TORCH_SPEC)" --python "$(PYTHON)"

# ruff (lint and format check) over the whole tree and mypy on the package: pyproject.toml holds
# their settings, CONTRIBUTING.md says how to fix what they report (`ruff format .`, `ruff check --fix .`).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup lint setup-vision check-cuda check-ext
	$(PY) -m pytest -q tests
	$(VISION_PY) -m pytest -q tests/test_vision.py
	$(MAKE) --no-print-directory check-install

demo: setup
	$(PY) -m eeruntime demo --out $(DEMO_OUT)

demo-vit: setup
	$(PY) -m eeruntime demo-vit --out $(DEMO_OUT)/vit

# Every suite in one run: bench/results/<device>-<date>.json plus its markdown tables and plots.
bench: setup
	$(PY) -m eeruntime bench

# On a GPU machine: build for sm_90, check the CUDA ops, run every GPU test, memcheck and the key
# benchmarks, time-boxed to 10 minutes; writes bench/results/<device>-<date>.json and .md
# (docs/gpu-check.md). No network: it uses the Python that already has torch and triton and never
# runs `make setup`. GPU_CHECK_ARGS="--dry-run" prints the plan; "--steps ext,tests" runs a part.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py --python $(GPU_PYTHON) $(GPU_CHECK_ARGS)

# The wheels a lent GPU machine lacks (no package index there; its python3 is 3.12): the HTTP
# server's stack, for its CUDA tests. Downloaded here into .gpu-wheels/, carried there and installed
# by tools/gpu_session.sh (docs/gpu-check.md, "Running it on a lent device").
GPU_WHEEL_PYTHON ?= 3.12
GPU_WHEELS ?= fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic_core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5 httptools==0.9.0 opentelemetry-api==1.45.2
gpu-wheels: $(VENV)/.stamp
	$(PY) -m pip download -q --no-deps --only-binary :all: --python-version $(GPU_WHEEL_PYTHON) \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		-d .gpu-wheels $(GPU_WHEELS)

clean:
	rm -rf build dist *.egg-info eeruntime/_C*.so eeruntime/_C_build.json $(DEMO_OUT)
