# The two commands a new user needs: `make up` and `make test`.
SHELL := /bin/bash
VENV := .venv

.PHONY: up test bench lint setup setup-dev model demo-adapter clean

up: setup  ## Set up on first run, then serve the gateway on :8000 with vLLM behind it
	$(VENV)/bin/quiver up

test: setup-dev lint  ## Set up what the tests need, check the code (make lint), then run the whole suite
	$(VENV)/bin/quiver model prepare >/dev/null
	scripts/test.sh

bench: setup-dev  ## Every comparison side by side in one run (see BENCHMARKS.md); writes bench/results/ and BENCHMARKS.md
	$(VENV)/bin/quiver bench

demo-adapter: setup-dev  ## Train the demo adapter (support triage), evaluate it against the baselines, push it
	$(VENV)/bin/quiver demo

PACKAGES := core adapters access jobs trainingdata gateway training loadtest quiver

lint: setup-dev  ## ruff (check and format), mypy --strict on every package, the layer contracts (import-linter)
	$(VENV)/bin/ruff check $(PACKAGES) tests
	$(VENV)/bin/ruff format --check $(PACKAGES) tests
	$(VENV)/bin/mypy $(PACKAGES)
	$(VENV)/bin/lint-imports

setup:
	@scripts/bootstrap.sh runtime

setup-dev:
	@scripts/bootstrap.sh dev

model: setup  ## Convert the embedded model (cached under ~/.cache/quiver)
	$(VENV)/bin/quiver model prepare

clean:
	rm -rf $(VENV) bench/results/*.tmp .pytest_cache
