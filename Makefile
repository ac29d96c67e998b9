# The same commands locally and in CI (.ci/run calls `make test`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install run test lint unit bench system-deps clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

install: $(BIN)/.installed

## Run the mirror: upstream Docker Hub, default cache directory, port 5000.
run: install
	$(BIN)/mirror serve

system-deps:
	bash scripts/system-deps.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## The whole suite: system packages, lint, type check, unit and end-to-end tests.
test: system-deps lint
	$(BIN)/pytest

unit: install
	$(BIN)/pytest -m "not e2e"

## Measurements (results in docs/benchmarks.md): side by side with Distribution's
## proxy mode (rewrites its section and plots), upstream read path, pull times.
bench: system-deps install
	$(BIN)/python -m bench.compare --write-docs
	$(BIN)/python bench/transport.py --size-mib 1024 --repeat 3
	$(BIN)/python bench/transport.py --size-mib 1024 --repeat 3 --mallopt
	$(BIN)/python bench/pull_times.py --repeat 3 --big-mib 256

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
