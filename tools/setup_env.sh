#!/usr/bin/env bash
# Create (or reuse) the project-local virtualenv and install the pinned stack.
#
# Idempotent: a venv whose stamp matches the requirements is reused as is.
# mmcv 2.1.0 is built from its sdist once (C++20 flag patched, see
# docs/install.md) and the wheel is kept in $REPL_MM_CACHE (default
# ~/.cache/repl_mm), outside the repo, so later venvs install it in seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPL_MM_VENV:-$ROOT/.venv}"
CACHE="${REPL_MM_CACHE:-$HOME/.cache/repl_mm}"
PYTHON="${PYTHON:-python3}"
MMCV_VERSION=2.1.0
WHEELS="$CACHE/wheels"
STAMP="$VENV/.repl_mm_stamp"

log() { echo "[setup_env] $*" >&2; }

want_stamp() {
    cat "$ROOT/requirements/"*.txt "$ROOT/setup.py" "$ROOT/tools/setup_env.sh" | sha256sum | cut -d' ' -f1
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
"${PIP[@]}" install -q -r "$ROOT/requirements/build.txt"
"${PIP[@]}" install -q -r "$ROOT/requirements/torch.txt"

mmcv_wheel() { ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1; }
if [[ -z "$(mmcv_wheel)" ]]; then
    log "building mmcv $MMCV_VERSION from source (one time, ~16 min on 2 cores)"
    mkdir -p "$WHEELS"
    work="$(mktemp -d)"
    "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation \
        -d "$work" "mmcv==$MMCV_VERSION"
    tar -xzf "$work"/mmcv-"$MMCV_VERSION".tar.gz -C "$work"
    src="$work/mmcv-$MMCV_VERSION"
    # torch >= 2.6 headers require C++20; mmcv 2.1.0 hard-codes C++17.
    grep -q -- "-std=c++17" "$src/setup.py"
    sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
    MAX_JOBS="${MAX_JOBS:-2}" MMCV_WITH_OPS=1 FORCE_CUDA="${FORCE_CUDA:-0}" \
        "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$WHEELS" "$src"
    rm -rf "$work"
fi
"${PIP[@]}" install -q --no-deps "$(mmcv_wheel)"
# mmcv's own runtime dependencies (not installed by --no-deps).
"${PIP[@]}" install -q -r "$ROOT/requirements/mm.txt"
"${PIP[@]}" install -q -e "$ROOT[all,tests]"
"$VENV/bin/python" -c "import mmcv.ops, mmdet, mmseg, mmpretrain, repl_mm"
want_stamp > "$STAMP"
log "ready: $VENV"
