# Thin wrappers: everything real lives in the package, tests/ and loadtest/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODE   ?= verify

.PHONY: install run test lint format bench soak stress-verify clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,embedded,lint,loadtest]'
	touch $(STAMP)

install: $(STAMP)

## make run: the service on its embedded default (a private PostgreSQL under ./.otelworker/)
run: install
	$(BIN)/python -m otelworker serve

## make test: the whole suite; provisions PostgreSQL and an S3 server itself
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check otelworker tests loadtest noxfile.py
	$(BIN)/ruff format --check otelworker tests loadtest noxfile.py
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

format: install
	$(BIN)/ruff format otelworker tests loadtest noxfile.py
	$(BIN)/ruff check --fix otelworker tests loadtest noxfile.py

## make bench: ingest and drain benchmarks, each beside its baseline
bench: install
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)

## make soak [SOAK_ARGS="--minutes 10 --connections 8 --spans 100"]: ROLE=all at a steady load
soak: install
	$(BIN)/python -m loadtest.bench soak $(SOAK_ARGS)

## make stress-verify [MODE=stress]: the stress harness
stress-verify: install
	$(BIN)/python -m loadtest.stress --mode $(MODE) $(STRESS_ARGS)

clean:
	rm -rf $(VENV) .nox .otelworker loadtest/reports .pytest_cache .mypy_cache .ruff_cache
