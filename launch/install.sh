#!/usr/bin/env bash
# Creates .venv in the repository root: the pinned stack of requirements.txt, JAX for one
# accelerator, and msf_jax in editable mode. Run it on every machine that trains (every
# worker of a TPU pod; once on the shared file system of a SLURM cluster).
#
#   launch/install.sh cpu|cuda12|tpu
#
# PYTHON picks the interpreter (Python 3.11; jax 0.10.2 has no wheels for 3.10).
set -euo pipefail

PYTHON=${PYTHON:-python3.11}
JAX_VERSION=0.10.2

usage() {
  echo "usage: $0 cpu|cuda12|tpu" >&2
  exit 2
}

[[ $# -eq 1 ]] || usage
case "$1" in
  cpu) jax_accelerator=() ;;
  cuda12) jax_accelerator=("jax[cuda12]==${JAX_VERSION}") ;;
  tpu) jax_accelerator=("jax[tpu]==${JAX_VERSION}") ;;
  *) usage ;;
esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! command -v "$PYTHON" > /dev/null; then
  echo "$PYTHON not found: install Python 3.11 (Ubuntu 22.04: sudo apt-get install -y" \
    "python3.11 python3.11-venv) or set PYTHON." >&2
  exit 1
fi

"$PYTHON" -m venv "$repo/.venv"
pip=("$repo/.venv/bin/python" -m pip install --quiet)
"${pip[@]}" --upgrade pip
"${pip[@]}" -r "$repo/requirements.txt" "${jax_accelerator[@]}"
"${pip[@]}" --no-deps -e "$repo"
"$repo/.venv/bin/python" -c 'import jax, msf_jax; print("jax", jax.__version__, "msf_jax", msf_jax.__version__)'
