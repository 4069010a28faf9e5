# prefrank — the two commands that matter: `make test` and `make demo` (both set everything up).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 is the CUDA 13.0 build: with the machine's nvcc it compiles the real CUDA extension too.
TORCH_SPEC ?= torch==2.14.1
TRITON_SPEC ?= triton==3.8.0
DEPS := numpy pytest pytest-benchmark pytest-xdist ruff ninja pybind11 setuptools wheel \
        transformers safetensors pillow tqdm matplotlib diffsort statsmodels pyyaml \
        trl==1.16.0 peft==0.21.2 hypothesis cut-cross-entropy==25.1.1 torchsurv==0.2.0
STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
SOURCES := $(wildcard csrc/*) setup.py

.PHONY: test demo showcase build bench lint clean

$(STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)" $(DEPS)
	touch $@

$(BUILD_STAMP): $(STAMP) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

test: build
	$(PY) -m ruff check prefrank triton_kernels tests benchmarks setup.py
	$(PY) -m pytest tests -q -n 2

demo: build
	$(PY) -m prefrank.demo

showcase: build
	$(PY) -m prefrank.showcase

bench: build
	$(PY) benchmarks/run.py

lint: $(STAMP)
	$(PY) -m ruff check prefrank triton_kernels tests benchmarks setup.py

clean:
	rm -rf build *.egg-info prefrank/_C*.so $(BUILD_STAMP)
