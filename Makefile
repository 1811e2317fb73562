# convlens — two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test test-random lint install install-test bench clean system-deps

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files make both commands idempotent: a second run reuses .venv.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/convlens demo --out out/demo

# PostgreSQL and chromium for the study server's tests (installed when missing; those tests skip without them)
system-deps:
	bash scripts/install_system_deps.sh

# PYTEST_ARGS: extra pytest options (.ci/run adds --durations=25 and, for its random-order variant, -p randomly)
test: $(VENV)/.installed-test system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests benchmarks tools

bench: $(VENV)/.installed-test
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf out .pytest_cache

# The suite in a random order (pytest-randomly; the seed is printed, rerun with -p randomly --randomly-seed=N).
test-random: $(VENV)/.installed-test
	$(PY) -m pytest -q -p randomly
