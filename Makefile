# kvthreads: the front door. `make help` lists the targets.
# Without DATABASE_URL, `run`, `migrate` and `db` use a local PostgreSQL kept in .data/pg, and
# `test` starts a throwaway one. With DATABASE_URL set, that server is used and none is started.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_PATHS := app kernels tests bench migrations devtools
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.DEFAULT_GOAL := help
.PHONY: help setup chromium db db-stop db-url migrate run test lint format bench model gpu-check

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## create .venv and install the pinned dependencies (instant when nothing changed)

# Reinstalls only when pyproject.toml changes. torch is pinned (==2.13.0) in pyproject.toml, so pip
# takes the CPU wheel on disk instead of downloading a CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# The billing page's browser test drives Debian's Chromium (never a downloaded browser build).
chromium: ## install Debian's Chromium for the browser test (skipped when /usr/bin/chromium exists)
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

db: setup ## start the local PostgreSQL (kept in .data/pg) and print its URL
	@$(PY) -m app dev db start

db-stop: setup ## stop the local PostgreSQL (its data stays)
	@$(PY) -m app dev db stop

db-url: setup ## print the local PostgreSQL's URL
	@$(PY) -m app dev db url

# One migrate: `kvthreads migrate`, on the URL `dev db start` prints (DATABASE_URL's when it is set).
migrate: setup ## upgrade the database schema (the local database unless DATABASE_URL is set)
	@url=$$($(PY) -m app dev db start) && DATABASE_URL="$$url" $(PY) -m app migrate

run: setup ## serve the real model on localhost:8000 (pulls it once; starts the local database, migrates, prints an API key)
	@$(PY) -m app dev run

model: setup ## download the real model (smollm2-135m-instruct, 98 MB GGUF) into .data/models
	@$(PY) -m app models pull smollm2-135m-instruct

test: setup chromium model ## run the test suite (pulls the real model once; a throwaway PostgreSQL unless DATABASE_URL is set)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup ## ruff check and format check
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: setup ## ruff format and the safe fixes
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

bench: setup ## the multi-turn benchmark, cache vs recompute over HTTP (~10 min on 2 cores; BENCH_ARGS=...)
	$(PY) -m bench.multiturn $(BENCH_ARGS)

# Needs only torch (a CUDA build) and triton, so no `setup`: .venv's python when there is one,
# else python3; GPU_PY=... names another.
GPU_PY ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
gpu-check: ## on a GPU, once: kernels, engine on CUDA (eager and CUDA graphs) vs CPU, target and benchmark tables (~2 min on an H200; GPU_ARGS=...)
	$(GPU_PY) bench/gpu_suite.py $(GPU_ARGS)
