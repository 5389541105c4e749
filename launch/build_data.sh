#!/usr/bin/env bash
# Builds a TFDS data set where training reads it, once, before the first run, with
# `python -m msf_jax.data.prepare` (what `tfds build` does; the tfds command of the pinned
# TFDS 4.9.10 imports apache_beam, which requirements.txt leaves out).
#
#   launch/build_data.sh [--dry-run] [NAME]      # NAME: imagenet2012 (default), cifar10, ...
#
# DATA_DIR is $BUCKET/tensorflow_datasets unless set (a gs:// folder or a shared file
# system). ImageNet has no public download: register at image-net.org, download
# ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, and put both, unopened, in MANUAL_DIR
# ($DATA_DIR/downloads/manual unless set). The build reads them and writes about as many
# bytes of array_record files (FILE_FORMAT; training reads them by index, a fresh order
# every epoch; tfrecord files can only be read in sequence): run it on a machine near the
# bucket. --dry-run prints the command.
set -euo pipefail

BUCKET=${BUCKET:-gs://my-bucket}             # placeholder: refused unless DATA_DIR is set
DATA_DIR=${DATA_DIR:-}
FILE_FORMAT=${FILE_FORMAT:-array_record}
PYTHON_BIN=${PYTHON_BIN:-.venv/bin/python}

PLACEHOLDER_BUCKET=gs://my-bucket

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=common.sh
source "$repo/launch/common.sh"

usage() {
  echo "usage: $0 [--dry-run] [NAME]   (settings: BUCKET or DATA_DIR, MANUAL_DIR," \
    "FILE_FORMAT)" >&2
  exit 2
}

resolve_data_dir() {
  if [[ -z $DATA_DIR ]]; then
    if [[ -z $BUCKET || $BUCKET == "$PLACEHOLDER_BUCKET" ]]; then
      die "BUCKET is not set (it is '$BUCKET'): export BUCKET=gs://<your bucket>, or set" \
        "DATA_DIR to the folder the data set goes to."
    fi
    DATA_DIR=$BUCKET/tensorflow_datasets
  fi
  MANUAL_DIR=${MANUAL_DIR:-$DATA_DIR/downloads/manual}
}

main() {
  take_dry_run "$@"
  set -- "${ARGS[@]}"
  (($# <= 1)) || usage
  local name=${1:-imagenet2012}
  [[ $name =~ ^[a-z0-9_]+(/[a-z0-9_.]+)?(:[0-9.]+)?$ ]] || usage
  resolve_data_dir
  cd "$repo"
  run "$PYTHON_BIN" -m msf_jax.data.prepare "$name" --data_dir="$DATA_DIR" \
    --manual_dir="$MANUAL_DIR" --file_format="$FILE_FORMAT"
}

main "$@"
