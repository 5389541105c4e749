#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: one process per TPU VM worker, all started at once by
# `gcloud compute tpus tpu-vm ssh --worker=all`; jax.distributed detects the slice itself.
#
#   launch/tpu_pod.sh create                       # the slice
#   launch/tpu_pod.sh setup                        # code (committed HEAD) + venv on every worker
#   launch/tpu_pod.sh train [--config.key=value]   # starts (or resumes) the run in the background
#   launch/tpu_pod.sh logs                         # follows worker 0's log
#   launch/tpu_pod.sh stop                         # SIGTERM everywhere: checkpoint, then exit
#   launch/tpu_pod.sh delete
#
# Checkpoints and metrics go to a gs:// bucket that every worker writes (orbax saves
# collectively); the TFDS data is read from the bucket too (see README.md, Data).
set -euo pipefail

PROJECT=${PROJECT:-my-gcp-project}
ZONE=${ZONE:-us-central2-b}
BUCKET=${BUCKET:-gs://my-bucket}
TPU_NAME=${TPU_NAME:-msf-pod}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-configs/imagenet_msf.py}
WORKDIR=${WORKDIR:-$BUCKET/msf_runs/imagenet_msf}
DATA_DIR=${DATA_DIR:-$BUCKET/tensorflow_datasets}
GCLOUD=${GCLOUD:-gcloud}

REMOTE_DIR=msf_jax                  # under each worker's home directory
LOG=msf_train.log                   # in each worker's home directory
PID_FILE=msf_train.pid

usage() {
  echo "usage: $0 create|setup|train|logs|stop|delete" >&2
  sed -n '4,10p' "${BASH_SOURCE[0]}" >&2
  exit 2
}

tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... for this slice
  local subcommand=$1
  shift
  "$GCLOUD" compute tpus tpu-vm "$subcommand" "$@" --project="$PROJECT" --zone="$ZONE"
}

on_workers() {  # WORKERS COMMAND: runs COMMAND on the workers ('all' or an index)
  tpu ssh "$TPU_NAME" --worker="$1" --command="$2"
}

create() {
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
}

setup() {
  local repo archive
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  archive=$(mktemp --suffix=.tar.gz)
  git -C "$repo" archive --format=tar.gz --prefix="$REMOTE_DIR/" -o "$archive" HEAD
  tpu scp "$archive" "$TPU_NAME:$REMOTE_DIR.tar.gz" --worker=all
  rm -f "$archive"
  on_workers all "set -e; sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv
    rm -rf $REMOTE_DIR && tar xzf $REMOTE_DIR.tar.gz && $REMOTE_DIR/launch/install.sh tpu"
}

train() {
  local command
  command=$(printf '%q ' .venv/bin/python -m msf_jax.main --config="$CONFIG" \
    --workdir="$WORKDIR" --config.data.data_dir="$DATA_DIR" "$@")
  on_workers all "cd $REMOTE_DIR && nohup $command > ~/$LOG 2>&1 < /dev/null &
    echo \$! > ~/$PID_FILE"
}

case "${1:-}" in
  create) create ;;
  setup) setup ;;
  train) shift; train "$@" ;;
  logs) on_workers 0 "tail -n 100 -f ~/$LOG" ;;
  stop) on_workers all "kill -TERM \$(cat ~/$PID_FILE)" ;;
  delete) tpu delete "$TPU_NAME" --quiet ;;
  *) usage ;;
esac
