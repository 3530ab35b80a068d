#!/usr/bin/env bash
# Usage: tools/gpu_check.sh [tools/gpu_check.py options]
# The GPU acceptance check (docs/gpu_check.md) of this checkout; PYTHON
# picks the interpreter.
set -euo pipefail
PYTHON=${PYTHON:-python}
PYTHONPATH="$(dirname "$0")/..":${PYTHONPATH:-} \
exec "$PYTHON" "$(dirname "$0")/gpu_check.py" "$@"
