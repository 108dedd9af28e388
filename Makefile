# Set-up contract: `make serve` and `make test` each create .venv and install the pinned
# dependencies on first use; nothing relies on packages installed by hand.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.installed-base
TEST_STAMP := $(VENV)/.installed-test

.PHONY: test test-slow lint serve clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(BASE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test,oracle]"
	touch $@ $(BASE_STAMP)

# The suite runs as three pytest processes: one process compiling all ~490 tests' programs
# crashed inside XLA:CPU's compiler near the end of the run (a different test each time, each
# passing alone), so no process is left to accumulate that much.
SPLIT := tests/engine tests/kernels tests/server tests/sharding
test: $(TEST_STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests/engine tests/kernels
	$(PY) -m pytest -q tests/server tests/sharding
	$(PY) -m pytest -q tests $(addprefix --ignore=,$(SPLIT))

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -q -m slow tests

serve: $(BASE_STAMP)
	$(PY) scripts/serve.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
