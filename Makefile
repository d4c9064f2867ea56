# Two entry points (README quick start): `make repro` runs the main job (the pipeline through
# registration), `make test` the tests (what CI runs, after `make lint`). Also: `make test-fast`
# (the unit tier, for the edit-run loop), `make lint` (ruff on the tree, mypy on components/),
# `make ablation` (the paper's method table) and `make bench` (benchmarks/). Each installs the
# pinned environment into .venv/ first when it is missing or out of date.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
STAMP := $(VENV)/.installed

UV_VERSION := 0.13.10

# uv installs the lock: the whole install took 30 s on a 2-core machine with nothing cached, where
# pip took 95 s for the lock alone (pip unpacks and byte-compiles one file at a time). pip installs
# only uv itself, pinned. --no-deps: the lock is already resolved; uv only downloads and installs.
# --compile-bytecode: each process would otherwise compile every module it imports, where bytecode
# files are not written (PYTHONDONTWRITEBYTECODE), about 5 CPU-s for a stage's imports. Where pip is
# pointed elsewhere by its variables (PIP_FIND_LINKS: a folder with the CPU build of torch;
# PIP_INDEX_URL, PIP_EXTRA_INDEX_URL: a mirror), uv is too; uv's own UV_* variables work as well.
$(STAMP): requirements.lock pyproject.toml requirements.in requirements-dev.in
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION) 2>&1 | { grep -v "is ignored: it is neither" || true; }
	where=(); for link in $${PIP_FIND_LINKS:-}; do where+=(--find-links "$$link"); done; \
	for index in $${PIP_EXTRA_INDEX_URL:-}; do where+=(--extra-index-url "$$index"); done; \
	where+=($${PIP_INDEX_URL:+--index-url "$$PIP_INDEX_URL"}); \
	$(VENV)/bin/uv pip install -q --python $(VENV)/bin/python --no-deps --compile-bytecode "$${where[@]}" -r requirements.lock
	$(VENV)/bin/uv pip install -q --python $(VENV)/bin/python --no-deps --no-build-isolation -e .
	touch $(STAMP)

.PHONY: install repro ablation bench test test-fast lint
install: $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro register

ablation: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro ablation

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks

# Whole test modules in two processes (-n 2 --dist loadfile): a module's services and trained
# fixtures stay shared by its tests, and the two cores are kept busy while one module waits (a
# third process gained nothing: with two the cores were busy about 90% of the run, with three
# 98%, and the run took as long). The modules go out longest first (tests/conftest.py); xdist would
# otherwise reorder them by their number of tests, which sends the long single-test modules last,
# to run alone at the end. The slowest tests are listed at the end, to keep the suite within its
# 20 minutes.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

# Tests that start no service, run no stage process and train nothing beyond a few tiny steps.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not integration and not e2e and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
