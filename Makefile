# Two entry points (README quick start): `make repro` runs the main job (the pipeline through
# registration), `make test` the tests. Also: `make ablation` (the paper's method table) and
# `make bench` (benchmarks/). Each installs the pinned environment into .venv/ first when it is
# missing or out of date.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	# --no-deps: the lock is already resolved; pip only downloads and installs.
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -r requirements.lock 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | { grep -v "is ignored: it is neither" || true; }
	touch $(STAMP)

.PHONY: install repro ablation bench test
install: $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro register

ablation: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro ablation

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
