#!/usr/bin/env bash
# Sets up .venv from the repo's pinned files (idempotent) and runs the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh requirements-test.txt
exec .venv/bin/python -m pytest "$@"
