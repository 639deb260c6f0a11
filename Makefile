# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo fleet-demo test lint typecheck pytest stress bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/crash_and_resume.py

# Four workers on four hosts share a PostgreSQL journal; two are killed; a fifth host resumes.
# Needs the PostgreSQL server binaries (initdb, pg_ctl, postgres); it says how to get them.
fleet-demo: $(STAMP)
	$(BIN)/python examples/fleet_demo.py

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

# Side-by-side benchmark (prints tables; see the README for a recorded run).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks.bench --scale --profile
	$(BIN)/python -m benchmarks.postgres

# Long, bounded runs with printed figures (not part of `make test`).
stress: $(STAMP)
	$(BIN)/python -m tests.stress.chaos --operations 5000
	$(BIN)/python -m tests.stress.random_kills --repetitions 20

clean:
	rm -rf $(VENV) build dist .mypy_cache .pytest_cache .ruff_cache
