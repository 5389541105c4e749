#!/usr/bin/env bash
# Creates .venv if needed and installs the pinned requirements file given (default
# requirements.txt) plus msf_jax in editable mode. Idempotent; sourced by test.sh and demo.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r "${1:-requirements.txt}"
.venv/bin/python -m pip install --quiet --no-deps -e .
