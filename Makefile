# Two commands matter: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch is installed first and pinned: the CPU build lies on local disk, and once it is
# present the [serve] extra's torch range is satisfied, so nothing pulls a CUDA build.
TORCH  := torch==2.13.0

.PHONY: install demo serve test test-fast test-multinode test-faults lint bench-priors bench-hits gpu-check cli-docs clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[serve,dev]'
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'torch was replaced: ' + torch.__version__)"
	touch $(STAMP)

demo: install
	$(BIN)/wattserve demo

serve: install
	$(BIN)/wattserve serve

# Two pytest processes: the multi-node and fault tests start clusters of their own and
# need a process that is not already a driver of the shared local cluster the `ray` tests use.
test: install
	$(BIN)/pytest -q --durations=10 -m "not multinode and not fault"
	$(BIN)/pytest -q --durations=10 -m "multinode or fault"

test-fast: install
	$(BIN)/pytest -q -m "not ray and not multinode and not fault"

# Multi-node tests: each module starts its own head + typed nodes (also part of make test).
test-multinode: install
	$(BIN)/pytest -q -m multinode

# The fault suite: real kills under load, then the shared invariants (also part of make test).
test-faults: install
	$(BIN)/pytest -q -m fault

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-priors: install
	$(BIN)/python benchmarks/measure_priors.py

# Needs `hey` (apt-get install hey, or go install github.com/rakyll/hey@latest).
bench-hits: install
	$(BIN)/python benchmarks/hit_throughput.py

gpu-check: install
	$(BIN)/python scripts/gpu_check.py

# docs/cli.md is generated from the Typer app; tests/test_cli_docs.py fails when it drifts.
cli-docs: install
	$(BIN)/typer wattserve.cli.main utils docs --name wattserve --output docs/cli.md

clean:
	rm -rf $(VENV) demo-out .pytest_cache
