# pgsse — `make run` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: help run stop test bench chaos lint clean

help: ## list targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-6s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

run: $(STAMP) ## embedded PostgreSQL (unless DATABASE_URL), demo data + writer, dashboard on :8000
	DEMO=$${DEMO:-1} LOG_FORMAT=$${LOG_FORMAT:-text} WORKERS=$${WORKERS:-auto} $(VENV)/bin/pgsse serve

stop: $(STAMP) ## stop the embedded PostgreSQL (make run stops it on Ctrl-C; this is for strays)
	$(VENV)/bin/pgsse db --stop

# The browser client's dev dependencies (eventsource-parser, typescript, query-core), from
# clients/js/package-lock.json; without npm the JS tests skip (fail under PGSSE_REQUIRE_TOOLS=1).
JS_STAMP := clients/js/node_modules/.installed
$(JS_STAMP): clients/js/package.json clients/js/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  npm --prefix clients/js ci --no-audit --no-fund && touch $@; \
	else echo "npm not found: the JS client tests will skip"; fi

test: $(STAMP) $(JS_STAMP) ## the whole suite (ephemeral PostgreSQL unless TEST_DATABASE_URL)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP) ## benchmarks: JSON report and PNG plots under bench/results/
	$(PY) -m bench

chaos: $(STAMP) ## loss/chaos suite (< 10 min): table, JSON and PNG under bench/results/chaos/
	$(PY) -m bench.chaos $(CHAOS_ARGS)

lint: $(STAMP) ## ruff and mypy --strict
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/mypy

clean: ## stop the embedded PostgreSQL, remove the venv and its data
	-$(VENV)/bin/pgsse db --stop 2>/dev/null
	rm -rf $(VENV) .data
