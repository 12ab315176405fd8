# Thin wrappers: everything real lives in the package, tests/ and loadtest/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install -q
MODE   ?= verify

.PHONY: install run test lint format bench soak stress-verify clean

# One stamp per set of extras, so that each target installs only what it needs and the
# targets compose (a change to the compiled walker, otelworker/_wire.c, reinstalls, which
# rebuilds it in place): `make run` the package and its embedded PostgreSQL (no linters, test
# tools, benchmark peers or Kubernetes schemas), `make test` adds the test tools.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: pyproject.toml setup.py otelworker/_wire.c | $(BIN)/python
	$(PIP) -e '.[embedded]'
	touch $@

$(VENV)/.installed-test: pyproject.toml setup.py otelworker/_wire.c | $(BIN)/python
	$(PIP) -e '.[test,embedded]'
	touch $@

$(VENV)/.installed-lint: pyproject.toml setup.py otelworker/_wire.c | $(BIN)/python
	$(PIP) -e '.[lint]'
	touch $@

# The benchmarks and the stress harness provision PostgreSQL and S3 as the tests do.
$(VENV)/.installed-loadtest: pyproject.toml setup.py otelworker/_wire.c | $(BIN)/python
	$(PIP) -e '.[test,embedded,loadtest]'
	touch $@

## make install: every extra (a development environment)
install: $(VENV)/.installed-test $(VENV)/.installed-lint $(VENV)/.installed-loadtest

## make run: the service on its embedded default (a private PostgreSQL under ./.otelworker/)
run: $(VENV)/.installed-run
	$(BIN)/python -m otelworker serve

## make test: the whole suite; provisions PostgreSQL and an S3 server itself
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-lint
	$(BIN)/ruff check otelworker tests loadtest noxfile.py
	$(BIN)/ruff format --check otelworker tests loadtest noxfile.py
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

format: $(VENV)/.installed-lint
	$(BIN)/ruff format otelworker tests loadtest noxfile.py
	$(BIN)/ruff check --fix otelworker tests loadtest noxfile.py

## make bench: ingest and drain benchmarks, each beside its baseline
bench: $(VENV)/.installed-loadtest
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)

## make soak [SOAK_ARGS="--minutes 10 --connections 8 --spans 100"]: ROLE=all at a steady load
soak: $(VENV)/.installed-loadtest
	$(BIN)/python -m loadtest.bench soak $(SOAK_ARGS)

## make stress-verify [MODE=stress]: the stress harness
stress-verify: $(VENV)/.installed-loadtest
	$(BIN)/python -m loadtest.stress --mode $(MODE) $(STRESS_ARGS)

clean:
	rm -rf $(VENV) .nox .otelworker loadtest/reports .pytest_cache .mypy_cache .ruff_cache
