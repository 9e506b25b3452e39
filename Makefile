# enricher: developer commands. Every target installs first when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install test lint typecheck format all run clean bench chaos

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/enricher dev

# Tests run in TEST_PROCS processes, each with its own broker and Redis: most of a test's time is
# spent waiting on worker processes and rates, so more processes than cores still pays.
TEST_PROCS ?= 4
test: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_PROCS)

# Benchmarks on the embedded stack (a few minutes; not part of `test`). ARGS="--quick" for a smoke run.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(ARGS)

# Faults and hostile input on the embedded stack (under 10 minutes; not part of `test`).
# ARGS="--only NAME" runs one scenario; ARGS="--scale 0.3" a shorter version of each.
chaos: $(STAMP)
	$(BIN)/python -m chaos.run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check enricher tests bench chaos
	$(BIN)/ruff format --check enricher tests bench chaos

format: $(STAMP)
	$(BIN)/ruff format enricher tests bench chaos
	$(BIN)/ruff check --fix enricher tests bench chaos

typecheck: $(STAMP)
	$(BIN)/mypy

all: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
