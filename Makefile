# Set-up contract: `make serve` and `make test` each create .venv and install the pinned
# dependencies on first use; nothing relies on packages installed by hand.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.installed-base
TEST_STAMP := $(VENV)/.installed-test

.PHONY: test test-slow serve clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(BASE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test,oracle]"
	touch $@ $(BASE_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q tests

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -q -m slow tests

serve: $(BASE_STAMP)
	$(PY) scripts/serve.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
