# Every target creates .venv when it is missing, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: demo demo-fleet test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_QUIET) --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_QUIET) -e '.[dashboard]'
	touch $@

$(VENV)/.installed-lint: pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_QUIET) -e '.[lint]'
	touch $@ $(VENV)/.installed-run

$(VENV)/.installed-fleet: pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_QUIET) -e '.[dashboard,postgres]'
	touch $@

demo: $(VENV)/.installed-run
	$(BIN)/python examples/queue_worker.py

# Two workers on one PostgreSQL queue and the fleet page (a throwaway cluster from
# Debian's postgresql package unless FLEET_DSN is set).
demo-fleet: $(VENV)/.installed-fleet
	$(BIN)/python examples/fleet_demo.py

test: $(VENV)/.installed-lint
	$(MAKE) lint
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(VENV)/.installed-run
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
