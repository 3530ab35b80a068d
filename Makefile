# Every target sets up (or reuses) its project-local venv first.
#   .venv         torch 2.14.1 (the default stack; make demo, make test)
#   .venv-compat  torch 2.1.2 + numpy<2 on the CPU: the users' GPU stack
#                 (OpenMMLab's prebuilt mmcv 2.1.0 needs torch 2.1)
VENV ?= .venv
PY := $(VENV)/bin/python
COMPAT_VENV := .venv-compat
LINT_PATHS := repl_mm tools tests configs
# The suite runs in TEST_WORKERS pytest-xdist processes, one torch thread
# each (conftest.py), work-stealing so that the long tool runs at the end
# spread over both; TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2
PYTEST_ARGS := -q -n $(TEST_WORKERS) --dist worksteal

.PHONY: setup setup-compat demo test test-compat lint doctest

setup:
	REPL_MM_VENV=$(VENV) bash tools/setup_env.sh

setup-compat:
	REPL_MM_STACK=compat REPL_MM_VENV=$(COMPAT_VENV) bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The whole suite again, on the users' stack.
test-compat: setup-compat
	$(COMPAT_VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

# flake8 + isort + yapf (setup.cfg; the checks of .pre-commit-config.yaml),
# all three run, non-zero exit if any reports something.
lint: setup
	@rc=0; \
	$(VENV)/bin/flake8 $(LINT_PATHS) || rc=1; \
	$(VENV)/bin/isort --check-only --diff $(LINT_PATHS) || rc=1; \
	$(VENV)/bin/yapf --diff --recursive $(LINT_PATHS) || rc=1; \
	exit $$rc

# The docstrings' Example: blocks, run as doctests.
doctest: setup
	$(PY) -m pytest -q --doctest-modules repl_mm
