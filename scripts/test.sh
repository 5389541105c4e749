#!/usr/bin/env bash
# Sets up .venv from the repo's pinned files (idempotent) and runs the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-test.txt
.venv/bin/python -m pip install --quiet --no-deps -e .
exec .venv/bin/python -m pytest "$@"
