# Two commands do all the set-up: `make run` (the main job) and `make test`.
# Both create .venv and install the pinned stack when missing (quick afterwards).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gendag-installed
export GENDAG_HOME ?= $(CURDIR)
export PYTHONHASHSEED = 0

.PHONY: run test test-all bench install clean-runs

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## The main job: rectified flow (1-RF -> couplings -> 2-RF -> couplings -> one-step distillation)
## on N(0, I) -> moons and on the 8x8 digits, cpu scale, in one process (one Prefect server, one
## Ray): runs/main/moons and runs/main/digits.
run: $(STAMP)
	$(BIN)/gendag run rectified-flow -c rectified-flow/moons -c rectified-flow/digits --scale cpu --out runs/main

## Everything but the fault-injection tests (marked slow); test-all runs those too.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py
