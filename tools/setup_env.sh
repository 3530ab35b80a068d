#!/usr/bin/env bash
# Create (or reuse) a project-local virtualenv and install the pinned stack.
#
#   REPL_MM_STACK=default (.venv):  torch 2.14.1 (requirements/torch.txt)
#   REPL_MM_STACK=compat  (.venv-compat): the users' GPU stack on the CPU,
#                          torch 2.1.2 + numpy<2 (requirements/compat.txt)
#
# Idempotent: a venv whose stamp matches the requirements is reused as is.
# mmcv 2.1.0 is built from its sdist once per torch version (for torch >=
# 2.6 its -std=c++17 flag becomes c++20, see docs/install.md) and the wheel
# is kept in $REPL_MM_CACHE/wheels/torch-<torch version>/ (default
# ~/.cache/repl_mm), outside the repo, so later venvs install it in seconds
# and the two stacks' wheels never overwrite each other.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${REPL_MM_STACK:-default}"
case "$STACK" in
    default) TORCH_REQ="$ROOT/requirements/torch.txt"; CONSTRAINTS=() ;;
    compat) TORCH_REQ="$ROOT/requirements/compat.txt"
            CONSTRAINTS=(-c "$ROOT/requirements/compat.txt") ;;
    *) echo "REPL_MM_STACK must be 'default' or 'compat', got '$STACK'" >&2
       exit 2 ;;
esac
DEFAULT_VENV="$ROOT/.venv"; [[ "$STACK" == compat ]] && DEFAULT_VENV="$ROOT/.venv-compat"
VENV="${REPL_MM_VENV:-$DEFAULT_VENV}"
CACHE="${REPL_MM_CACHE:-$HOME/.cache/repl_mm}"
PYTHON="${PYTHON:-python3}"
MMCV_VERSION=2.1.0
STAMP="$VENV/.repl_mm_stamp"

log() { echo "[setup_env:$STACK] $*" >&2; }

want_stamp() {
    { echo "$STACK"; cat "$ROOT/requirements/"*.txt "$ROOT/setup.py" \
        "$ROOT/tools/setup_env.sh"; } | sha256sum | cut -d' ' -f1
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(want_stamp)" ]]; then
    log "reusing $VENV"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel
"${PIP[@]}" install -q "${CONSTRAINTS[@]}" -r "$ROOT/requirements/build.txt"
"${PIP[@]}" install -q "${CONSTRAINTS[@]}" -r "$TORCH_REQ"

TORCH_VERSION="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
WHEELS="$CACHE/wheels/torch-$TORCH_VERSION"
mmcv_wheel() { ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1; }
if [[ -z "$(mmcv_wheel)" ]]; then
    log "building mmcv $MMCV_VERSION against torch $TORCH_VERSION from" \
        "source (one time, ~16 min on 2 cores)"
    mkdir -p "$WHEELS"
    work="$(mktemp -d)"
    "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation \
        -d "$work" "mmcv==$MMCV_VERSION"
    tar -xzf "$work"/mmcv-"$MMCV_VERSION".tar.gz -C "$work"
    src="$work/mmcv-$MMCV_VERSION"
    grep -q -- "-std=c++17" "$src/setup.py"
    if "$VENV/bin/python" -c 'import sys, torch
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if v >= (2, 6) else 1)'; then
        # torch >= 2.6 headers require C++20; mmcv 2.1.0 hard-codes C++17.
        sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
    fi
    MAX_JOBS="${MAX_JOBS:-2}" MMCV_WITH_OPS=1 FORCE_CUDA="${FORCE_CUDA:-0}" \
        "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$work/out" "$src"
    # Into the cache only when complete: an interrupted build leaves none.
    mv "$work"/out/mmcv-"$MMCV_VERSION"-*.whl "$WHEELS/"
    rm -rf "$work"
fi
"${PIP[@]}" install -q --no-deps "$(mmcv_wheel)"
# mmcv's own runtime dependencies (not installed by --no-deps).
"${PIP[@]}" install -q "${CONSTRAINTS[@]}" -r "$ROOT/requirements/mm.txt"
"${PIP[@]}" install -q "${CONSTRAINTS[@]}" -e "$ROOT[all,tests]"
# flake8, isort, yapf for `make lint` (pinned; no effect on the stack).
"${PIP[@]}" install -q "${CONSTRAINTS[@]}" -r "$ROOT/requirements/lint.txt"
"$VENV/bin/python" -c "import mmcv.ops, mmdet, mmseg, mmpretrain, repl_mm"
want_stamp > "$STAMP"
log "ready: $VENV (torch $TORCH_VERSION)"
