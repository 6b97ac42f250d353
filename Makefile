# pgsse — `make run` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help run test bench lint clean

help: ## list targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-6s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

run: $(STAMP) ## embedded PostgreSQL (unless DATABASE_URL), demo data + writer, dashboard on :8000
	DEMO=$${DEMO:-1} LOG_FORMAT=$${LOG_FORMAT:-text} $(VENV)/bin/pgsse serve

test: $(STAMP) ## the whole suite (ephemeral PostgreSQL unless TEST_DATABASE_URL)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP) ## benchmarks: JSON report and PNG plots under bench/results/
	$(PY) -m bench

lint: $(STAMP) ## ruff and mypy --strict
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/mypy

clean: ## remove the venv and embedded database data
	rm -rf $(VENV) .data
