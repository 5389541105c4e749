#!/usr/bin/env bash
# Creates .venv in the repository root: the pinned stack of requirements.txt, JAX for one
# accelerator, and msf_jax in editable mode. Run it on every machine that trains (every
# worker of a TPU pod slice: `tpu_pod.sh setup` does it; once on the shared file system of
# a SLURM cluster).
#
#   launch/install.sh [--dry-run] cpu|cuda12|tpu
#
# --dry-run prints the commands instead of running them. PYTHON picks the interpreter
# (Python 3.11; jax 0.10.2 has no wheels for 3.10).
set -euo pipefail

PYTHON=${PYTHON:-python3.11}
JAX_VERSION=0.10.2

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=common.sh
source "$repo/launch/common.sh"

usage() {
  echo "usage: $0 [--dry-run] cpu|cuda12|tpu" >&2
  exit 2
}

jax_requirement() {  # ACCELERATOR: the extra JAX package for it (none for the CPU)
  case "$1" in
    cpu) ;;
    cuda12) echo "jax[cuda12]==${JAX_VERSION}" ;;
    tpu) echo "jax[tpu]==${JAX_VERSION}" ;;
    *) usage ;;
  esac
}

check_python() {
  if ! command -v "$PYTHON" > /dev/null; then
    die "$PYTHON not found: install Python 3.11 (Ubuntu 22.04: sudo apt-get install -y" \
      "python3.11 python3.11-venv) or set PYTHON."
  fi
}

main() {
  take_dry_run "$@"
  set -- "${ARGS[@]}"
  [[ $# -eq 1 ]] || usage
  local extra venv_python="$repo/.venv/bin/python"
  extra=$(jax_requirement "$1")
  ((DRY_RUN)) || check_python
  local pip=("$venv_python" -m pip install --quiet)
  run "$PYTHON" -m venv "$repo/.venv"
  run "${pip[@]}" --upgrade pip
  run "${pip[@]}" -r "$repo/requirements.txt" ${extra:+"$extra"}
  run "${pip[@]}" --no-deps -e "$repo"
  run "$venv_python" -c \
    'import jax, msf_jax; print("jax", jax.__version__, "msf_jax", msf_jax.__version__)'
}

main "$@"
