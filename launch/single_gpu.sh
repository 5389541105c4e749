#!/usr/bin/env bash
# Trains on one GPU machine: one process drives all of its GPUs (the mesh spans them).
#
#   launch/single_gpu.sh [--dry-run] [--config.key=value ...]
#
# Installs CUDA JAX into .venv on the first run. Run it again to resume from the latest
# checkpoint in WORKDIR: after a reboot, a preempted spot VM, or `kill -TERM` (the run saves
# a checkpoint on SIGTERM, then exits). --dry-run prints the commands without running them.
set -euo pipefail

CONFIG=${CONFIG:-configs/imagenet_msf.py}
WORKDIR=${WORKDIR:-runs/imagenet_msf}
DATA_DIR=${DATA_DIR:-}                     # TFDS data_dir; empty: ~/tensorflow_datasets
PYTHON_BIN=${PYTHON_BIN:-.venv/bin/python}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=common.sh
source "$repo/launch/common.sh"

has_cuda_jax() {
  "$PYTHON_BIN" -m pip show --quiet jax-cuda12-plugin 2> /dev/null
}

check_gpu() {
  if ! "$PYTHON_BIN" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
    die "JAX sees no GPU: check nvidia-smi and the CUDA 12 driver."
  fi
}

main() {
  take_dry_run "$@"
  set -- "${ARGS[@]}"
  cd "$repo"
  if ! has_cuda_jax; then
    run launch/install.sh cuda12
  fi
  ((DRY_RUN)) || check_gpu
  local data_flags=()
  if [[ -n $DATA_DIR ]]; then
    data_flags=("--config.data.data_dir=$DATA_DIR")
  fi
  local training=("$PYTHON_BIN" -m msf_jax.main --config="$CONFIG" --workdir="$WORKDIR"
    "${data_flags[@]}" "$@")
  if ((DRY_RUN)); then
    command_line "${training[@]}"
  else
    exec "${training[@]}"
  fi
}

main "$@"
