#!/usr/bin/env bash
# Sets up .venv from the repo's pinned files (idempotent) and runs the static checks, with
# their settings from pyproject.toml: ruff's lint (pyflakes, bugbear, import order) and its
# formatter's check over the repository, and mypy over msf_jax/. CI runs it before the tests.
# Every check runs and the status is non-zero when any fails. To fix what ruff can itself:
#   .venv/bin/ruff check --fix . && .venv/bin/ruff format .
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh requirements-test.txt
status=0
.venv/bin/ruff check . || status=1
.venv/bin/ruff format --check . || status=1
.venv/bin/mypy || status=1
exit "$status"
