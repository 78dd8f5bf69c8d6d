#!/usr/bin/env bash
# Make (or reuse) the project's Python 3.12 environment in .venv and install the project into it.
# Current JAX needs Python >= 3.12: use python3.12 from PATH, else the newest 3.12+ that pyenv has installed.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for cand in python3.12 python3.13; do
    if command -v "$cand" >/dev/null 2>&1; then command -v "$cand"; return; fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(ls -d "$(pyenv root)"/versions/3.1[2-9]* 2>/dev/null | sort -V -r); do
      if [ -x "$v/bin/python3" ]; then echo "$v/bin/python3"; return; fi
    done
  fi
  echo "no Python >= 3.12 found: install one (e.g. 'pyenv install 3.12') and rerun" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -e ".[test]"
echo "environment ready: $(.venv/bin/python --version), jax $(.venv/bin/python -c 'import jax; print(jax.__version__)')"
