# Every target sets up (or reuses) its project-local venv first.
#   .venv         torch 2.14.1 (the default stack; make demo, make test)
#   .venv-compat  torch 2.1.2 + numpy<2 on the CPU: the users' GPU stack
#                 (OpenMMLab's prebuilt mmcv 2.1.0 needs torch 2.1)
VENV ?= .venv
PY := $(VENV)/bin/python
COMPAT_VENV := .venv-compat

.PHONY: setup setup-compat demo test test-compat

setup:
	REPL_MM_VENV=$(VENV) bash tools/setup_env.sh

setup-compat:
	REPL_MM_STACK=compat REPL_MM_VENV=$(COMPAT_VENV) bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest tests -q

# The whole suite again, on the users' stack.
test-compat: setup-compat
	$(COMPAT_VENV)/bin/python -m pytest tests -q
