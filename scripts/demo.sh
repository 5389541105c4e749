#!/usr/bin/env bash
# Sets up .venv (idempotent) and runs the offline demo: MSF on scikit-learn's digits, then
# the trained encoder's kNN and linear probe next to a random one's. Extra arguments go to
# msf_jax.main, e.g. `bash scripts/demo.sh --workdir=/tmp/demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh requirements.txt
exec .venv/bin/python -m msf_jax.main --config=configs/demo.py --workdir=runs/demo "$@"
