# Every target sets up (or reuses) the project-local venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test

setup:
	REPL_MM_VENV=$(VENV) bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest tests -q
