# Two commands on a fresh machine: `make run` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-fast test-postgres setup lint format bench

setup: $(VENV)/.installed node_modules/.installed

# Re-install only when the dependency list changes; a second `make run` skips straight to start.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# uPlot for the live charts comes from npm with a lockfile, never from a CDN.
node_modules/.installed: $(wildcard package-lock.json)
	@if [ ! -f package-lock.json ]; then mkdir -p node_modules; \
	elif command -v npm >/dev/null; then npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: charts need it (sudo apt-get install npm), continuing without"; mkdir -p node_modules; exit 0; fi
	@touch $@

run: setup
	$(PY) -m studio.runtime run --port $(PORT)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not e2e and not slow and not integration" $(PYTEST_ARGS)

# The database-facing part of the suite on PostgreSQL (DATABASE_URL must point at a server).
test-postgres: setup
	$(PY) -m pytest -m "not e2e and not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	@for b in bench/*.py; do echo "# $$b"; $(PY) $$b || exit 1; done
