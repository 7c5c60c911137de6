# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs (torch CPU first, then medtwin, then anvil from npm).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medtwin-installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export RAY_USAGE_STATS_ENABLED := 0
export FLWR_HOME := $(CURDIR)/.flwr

.PHONY: install demo deploy-demo test test-fast bench clean

$(STAMP): pyproject.toml $(wildcard package-lock.json)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip || true
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,tracking,sweep]"
	# `npm install` with the committed lock (npm ci here rejects the lock for lacking other platforms' optional anvil builds)
	if [ -f package-lock.json ]; then npm install --no-audit --no-fund --loglevel=error; fi
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/medtwin demo

# every party as its own process on loopback: TLS SuperLink, 4 SuperNodes, 2 anvil chains, an auditor
deploy-demo: install
	$(BIN)/python -m medtwin.experiments.deploy_demo

# unit tests on both cores (pytest-xdist), then the integration tests on both cores too, one test file per
# worker (--dist loadfile: a file's tests share its module fixtures); each test starts its own Ray, anvil and
# Flower processes on free loopback ports and stops them by PID
test: install
	$(BIN)/pytest -q -n 2 -m "not slow"
	$(BIN)/pytest -q -n 2 --dist loadfile -m slow

test-fast: install
	$(BIN)/pytest -q -n 2 -m "not slow"

bench: install
	$(BIN)/python -m medtwin.experiments.bench_fed_heart_disease

clean:
	rm -rf $(VENV) node_modules .flwr runs outputs multirun
