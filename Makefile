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

# The suite runs as three pytest processes: one process compiling all ~500 tests' programs
# crashed inside XLA:CPU's compiler near the end of the run (a different test each time, each
# passing alone), so no process is left to accumulate that much. The tests are compile-bound
# and XLA:CPU compiles on one thread, so on CI's two cores they run in two lanes at once
# (lane A's output is printed when both are done; either lane failing fails the target). The
# processes, and the servers they start, share one compilation cache made for the run
# (tests/conftest.py), so a program compiled in one is loaded by the others.
SPLIT := tests/engine tests/kernels tests/server tests/sharding tests/test_decode_state.py
# Lane B's third process (balances the lanes, ~15 min each on this 2-core machine): the MTP and
# constrained-decoding tests on the demo
LANE_B_TOO := tests/engine/test_speculative.py tests/engine/test_constrained.py
# ... and its fourth: the runner on 8 fake devices. In the third process, after its ~12 tests'
# programs, the first of these crashed inside XLA:CPU (segfault, twice in a row).
LANE_B_MESH := tests/sharding/test_speculative_on_mesh.py tests/sharding/test_sharded_runner.py
LANE_A_LOG := .pytest-lane-a.log
TMP_A := $(or $(TMPDIR),/tmp)/dsv4-pytest-lane-a
TMP_B := $(or $(TMPDIR),/tmp)/dsv4-pytest-lane-b
test: $(TEST_STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	@export DSV4_TEST_COMPILE_CACHE=$$(mktemp -d); \
	( $(PY) -m pytest -q --durations=10 --basetemp=$(TMP_A) tests/engine tests/kernels $(addprefix --ignore=,$(LANE_B_TOO) $(LANE_B_MESH)) && \
		$(PY) -m pytest -q --durations=10 --basetemp=$(TMP_A) tests/server tests/sharding tests/test_decode_state.py $(addprefix --ignore=,$(LANE_B_TOO) $(LANE_B_MESH)) ) \
		> $(LANE_A_LOG) 2>&1 & lane_a=$$!; \
	( $(PY) -m pytest -q --durations=10 --basetemp=$(TMP_B) tests $(addprefix --ignore=,$(SPLIT)) && \
		$(PY) -m pytest -q --durations=10 --basetemp=$(TMP_B) $(LANE_B_TOO) && \
		$(PY) -m pytest -q --durations=10 --basetemp=$(TMP_B) $(LANE_B_MESH) ); lane_b=$$?; \
	wait $$lane_a; lane_a=$$?; \
	echo "--- lane A (tests/engine tests/kernels, then tests/server tests/sharding tests/test_decode_state.py):"; \
	cat $(LANE_A_LOG); \
	echo "lane A exit $$lane_a, lane B exit $$lane_b"; \
	rm -rf "$$DSV4_TEST_COMPILE_CACHE"; \
	test $$lane_a -eq 0 -a $$lane_b -eq 0

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -q -m slow tests

serve: $(BASE_STAMP)
	$(PY) scripts/serve.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
