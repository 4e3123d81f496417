#!/usr/bin/env bash
# A Python 3.12 virtualenv with jaxpar (editable) and its test extras at the newest JAX pip
# finds for 3.12 within pyproject's bounds: CI's second run, and the jax 0.12 benchmarks.
#   usage: bash scripts/venv_py312.sh [VENV]    (default: .venv-jax012)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-jax012}"
py=""
for cand in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do
  if command -v "$cand" >/dev/null 2>&1 \
      && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    py="$cand"
    break
  fi
done
[ -n "$py" ] || { echo "need Python 3.12 (python3.12 on PATH, or pyenv's 3.12)" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo[test]"
"$venv/bin/python" -c "import jax, sys; print(f'{sys.argv[1]}: Python {sys.version.split()[0]}, jax {jax.__version__}')" "$venv"
