#!/usr/bin/env bash
# Sets up .venv from the repo's pinned files (idempotent) and runs the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`; the tests run in
# MSF_JAX_TEST_WORKERS processes (default 2; `-n 0` runs them in this one), each taking whole
# test files, those with the most slow tests first (tests/conftest.py orders them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh requirements-test.txt
exec .venv/bin/python -m pytest -n "${MSF_JAX_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
