#!/usr/bin/env bash
# Creates .venv (Python >= 3.12), installs the project, fetches the data cache.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for cand in "${PYTHON:-}" python3.12 python3 "$HOME/.pyenv/versions/3.12.1/bin/python3.12"; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c \
        'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  echo "error: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  PY=$(find_python)
  echo "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | { grep -v '^WARNING: Location' || true; }
.venv/bin/python -m pip install -q -r requirements.txt 2>&1 | { grep -v '^WARNING: Location' || true; }
.venv/bin/python -m pip install -q --no-deps -e . 2>&1 | { grep -v -e '^WARNING: Location' -e 'BuildBackendWarning' || true; }
.venv/bin/python -c 'import jax, turboquant_jax; print("jax", jax.__version__, "on", jax.default_backend())'
.venv/bin/python -m turboquant_jax.data.fetch
