#!/usr/bin/env bash
# Make (or reuse) the project's Python 3.12 environment in .venv and install the project into it.
# Current JAX needs Python >= 3.12 (the GPU machines run 3.12): python3.12 from PATH, else the oldest 3.12+ in pyenv.
set -euo pipefail
cd "$(dirname "$0")/.."

usable() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  # pyenv's shims exist for versions that are installed but not selected, and fail when run: try each candidate.
  local cand
  for cand in python3.12 python3.13 python3 \
              $( (ls -d "$(pyenv root 2>/dev/null)"/versions/3.1[2-9]*/bin/python3 2>/dev/null || true) | sort -V); do
    if usable "$cand"; then command -v "$cand" || echo "$cand"; return; fi
  done
  echo "no Python >= 3.12 found: install one (e.g. 'pyenv install 3.12') and rerun" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -e ".[test,tpu]"  # libtpu: the TPU kernels compile ahead of time in the tests
echo "environment ready: $(.venv/bin/python --version), jax $(.venv/bin/python -c 'import jax; print(jax.__version__)')"
