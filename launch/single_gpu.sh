#!/usr/bin/env bash
# Trains on one GPU machine: one process drives all of its GPUs (the mesh spans them).
#
#   launch/single_gpu.sh [--config.key=value ...]
#
# Installs CUDA JAX into .venv on the first run. Run it again to resume the run in WORKDIR.
set -euo pipefail

CONFIG=${CONFIG:-configs/imagenet_msf.py}
WORKDIR=${WORKDIR:-runs/imagenet_msf}
DATA_DIR=${DATA_DIR:-}                     # TFDS data_dir; empty: TFDS's default (~/tensorflow_datasets)
PYTHON_BIN=${PYTHON_BIN:-.venv/bin/python}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
if ! "$PYTHON_BIN" -m pip show --quiet jax-cuda12-plugin 2> /dev/null; then
  launch/install.sh cuda12
fi
if ! "$PYTHON_BIN" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
  echo "JAX sees no GPU: check nvidia-smi and the CUDA 12 driver." >&2
  exit 1
fi

data_flags=()
if [[ -n "$DATA_DIR" ]]; then
  data_flags=("--config.data.data_dir=$DATA_DIR")
fi
exec "$PYTHON_BIN" -m msf_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  "${data_flags[@]}" "$@"
