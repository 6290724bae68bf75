# The two commands: `make run` trains on the bundled sample, `make test` runs the checks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Prefect keeps its database and settings here, not in the user's home.
export PREFECT_HOME ?= $(CURDIR)/.venv/prefect-home
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup run test lint bench clean serve ui-check trigger-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: setup
	$(BIN)/lrflow train --data data/sample.parquet --output out/sample --exclude id

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# A local Prefect server + work pool + deployments + worker; Ctrl-C stops them.
serve: setup
	scripts/serve.sh

# A real server, the work pool, a worker: train/nightly runs once, score/nightly must
# follow it by its trigger (~80 s; `make test` runs it too, as tests/test_trigger.py).
trigger-check: setup
	$(BIN)/python scripts/trigger_check.py

# Needs Chromium (apt-get install -y chromium); kept out of `make test` for that reason.
ui-check: setup
	$(BIN)/python scripts/ui_check.py --out docs

bench: setup
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf out .pytest_cache .ruff_cache .mypy_cache
