# enricher: developer commands. Every target installs first when needed.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install test lint typecheck format all run clean bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/enricher dev

test: $(STAMP)
	$(BIN)/pytest -q

# Benchmarks on the embedded stack (a few minutes; not part of `test`). ARGS="--quick" for a smoke run.
bench: $(STAMP)
	$(BIN)/python -m bench.run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check enricher tests bench
	$(BIN)/ruff format --check enricher tests bench

format: $(STAMP)
	$(BIN)/ruff format enricher tests bench
	$(BIN)/ruff check --fix enricher tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

all: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
