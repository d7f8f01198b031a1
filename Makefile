# The two commands of the README: `make demo` and `make test`.
# Each creates its own virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.jobflow-installed

.PHONY: demo test lint clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jobflow demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy

test: lint
	bash scripts/ensure-test-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis dist build

# `make bench` (BENCH_ARGS=--quick for a smoke run): the benchmarks of
# docs/benchmarks.md, in their own virtual environment holding jobflow and the
# latest procrastinate and pgqueuer, which are never dependencies of jobflow.
BENCH_VENV ?= bench/.venv
BENCH_STAMP := $(BENCH_VENV)/.jobflow-bench-installed

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade -e '.[postgres]' \
		procrastinate 'pgqueuer[asyncpg]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m bench.claim_throughput $(BENCH_ARGS)
	$(BENCH_VENV)/bin/python -m bench.wakeup_latency $(BENCH_ARGS)
	$(BENCH_VENV)/bin/python -m bench.worker_throughput $(BENCH_ARGS)
	$(BENCH_VENV)/bin/python -m bench.async_loop $(BENCH_ARGS)
