#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: one msf_jax process per TPU VM worker, all started by
# `gcloud compute tpus tpu-vm ssh --worker=all`; jax.distributed finds the slice by itself.
# Checkpoints, metrics and logs go to a gs:// bucket, so a preempted slice loses nothing
# but the steps since the last checkpoint.
#
#   launch/tpu_pod.sh [--dry-run] COMMAND [--config.key=value ...]
#
#   create       the slice (spot, on-demand, or a queued resource: SPOT, QUEUED)
#   setup        the repository at COMMIT and .venv with jax[tpu] on every worker
#   train        starts or resumes training on every worker, in the background
#   supervise    keeps training alive: creates the slice if needed, and after a preemption
#                deletes and recreates it, sets it up and restarts the same training
#                command, which resumes from the last checkpoint in the bucket; deletes
#                the slice when training has ended (KEEP_SLICE=1 keeps it)
#   status       the slice's state, and the train and eval runs' status on worker 0
#   logs [NAME]  follows worker 0's log (NAME: train or eval)
#   tensorboard  TensorBoard on WORKDIR, here
#   evaluate     configs/eval.py:imagenet on the latest checkpoint, on every worker
#   stop [NAME]  SIGTERM on every worker: a checkpoint, then exit (stop supervise first)
#   delete       the slice (and its queued resource)
#
# Arguments after train, supervise and evaluate go to msf_jax.main. create, train and
# supervise first plan the run on this machine (python -m msf_jax.plan, with libtpu: no TPU)
# and refuse a config that does not fit ACCELERATOR_TYPE's chips, before any slice exists;
# --no-plan skips that. --dry-run prints the commands without running them. Settings come from the environment (see below);
# PROJECT and BUCKET must be set. launch/README.md walks through a whole run.
set -euo pipefail

PROJECT=${PROJECT:-my-gcp-project}      # placeholder: refused
BUCKET=${BUCKET:-gs://my-bucket}        # placeholder: refused
ZONE=${ZONE:-us-central2-b}             # a zone that has ACCELERATOR_TYPE
TPU_NAME=${TPU_NAME:-msf-pod}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-}    # empty: the generation's, from the table below
SPOT=${SPOT:-1}                         # 1: spot capacity (preemptible, much cheaper)
QUEUED=${QUEUED:-0}                     # 1: ask through a queued resource, which waits for capacity
QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME-request}
CONFIG=${CONFIG:-configs/imagenet_msf.py}
WORKDIR=${WORKDIR:-$BUCKET/msf_runs/imagenet_msf}
DATA_DIR=${DATA_DIR:-$BUCKET/tensorflow_datasets}
EVAL_WORKDIR=${EVAL_WORKDIR:-$WORKDIR/eval}
COMMIT=${COMMIT:-}                      # empty: this checkout's HEAD, fixed when the script starts
RUN_ID=${RUN_ID:-$TPU_NAME}             # one id across restarts: see remote_job
POLL_SECONDS=${POLL_SECONDS:-60}        # supervise: time between two looks at the slice
MAX_RESTARTS=${MAX_RESTARTS:-100}       # supervise: recoveries before it gives up
KEEP_SLICE=${KEEP_SLICE:-0}             # supervise: 1 keeps the slice when training has ended
GCLOUD=${GCLOUD:-gcloud}
PLAN_PYTHON=${PLAN_PYTHON:-}            # empty: this checkout's .venv/bin/python, else python3
NO_PLAN=0                               # --no-plan: start without planning first

PLACEHOLDER_PROJECT=my-gcp-project
PLACEHOLDER_BUCKET=gs://my-bucket
REMOTE_DIR=msf_jax                      # under each worker's home directory

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=common.sh
source "$repo/launch/common.sh"

usage() {  # [STATUS]: the command list of the header; 2 (a usage error) unless told
  {
    echo "usage:"
    sed -n '/^#   launch\/tpu_pod.sh/,/^#   delete/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    echo "Settings (PROJECT, BUCKET, ZONE, ACCELERATOR_TYPE, ...): the top of $0."
  } >&2
  exit "${1:-2}"
}

# --- The slice ------------------------------------------------------------------------------

# One row per TPU generation, keyed by the prefix of the accelerator type:
#   runtime version (the TPU VM image Cloud TPU's docs give for JAX on it), and what the
#   number in the accelerator type counts per worker VM of a multi-host slice: v4 and v5p
#   count TensorCores (2 a chip, 4 chips a VM: 8), v5e and v6e count chips (4 a VM).
#   Up to 8 the slice is a single VM.
generation_row() {  # GENERATION: "RUNTIME_VERSION UNITS_PER_WORKER"
  case $1 in
    v4) echo "tpu-ubuntu2204-base 8" ;;
    v5p) echo "v2-alpha-tpuv5 8" ;;
    v5litepod) echo "v2-alpha-tpuv5-lite 4" ;;  # v5e
    v6e) echo "v2-alpha-tpuv6e 4" ;;
    *) return 1 ;;
  esac
}

# Reads ACCELERATOR_TYPE; sets RUNTIME_VERSION (unless given) and WORKERS.
resolve_accelerator() {
  local generation size row units
  if [[ ! $ACCELERATOR_TYPE =~ ^(v[0-9a-z]+)-([0-9]+)$ ]]; then
    die "ACCELERATOR_TYPE=$ACCELERATOR_TYPE is not GENERATION-SIZE (e.g. v4-32, v5p-32," \
      "v5litepod-16, v6e-16)."
  fi
  generation=${BASH_REMATCH[1]} size=${BASH_REMATCH[2]}
  if ! row=$(generation_row "$generation"); then
    die "Unknown TPU generation '$generation' in ACCELERATOR_TYPE=$ACCELERATOR_TYPE: known" \
      "are v4, v5p, v5litepod (v5e) and v6e. Another needs its row in generation_row," \
      "in $0."
  fi
  RUNTIME_VERSION=${RUNTIME_VERSION:-${row% *}}
  units=${row#* }
  WORKERS=$((size <= 8 ? 1 : size / units))
}

# Refuses the placeholder values of the header, which would fail later and less clearly.
check_settings() {
  if [[ -z $PROJECT || $PROJECT == "$PLACEHOLDER_PROJECT" ]]; then
    die "PROJECT is not set (it is '$PROJECT'): export PROJECT=<your project id>" \
      "(gcloud projects list shows them)."
  fi
  if [[ -z $BUCKET || $BUCKET == "$PLACEHOLDER_BUCKET" ]]; then
    die "BUCKET is not set (it is '$BUCKET'): export BUCKET=gs://<your bucket>, a bucket" \
      "in the region of ZONE=$ZONE (gcloud storage buckets create gs://NAME --location=REGION)."
  fi
  [[ $BUCKET == gs://* ]] || die "BUCKET must be a gs:// bucket, got '$BUCKET'."
  [[ $SPOT == [01] && $QUEUED == [01] && $KEEP_SLICE == [01] ]] ||
    die "SPOT, QUEUED and KEEP_SLICE are 0 or 1 (got $SPOT, $QUEUED, $KEEP_SLICE)."
}

describe_plan() {  # one comment line: what the commands act on
  local capacity=on-demand
  ((SPOT)) && capacity=spot
  ((QUEUED)) && capacity+=", queued resource $QUEUED_RESOURCE"
  echo "# $TPU_NAME: $ACCELERATOR_TYPE, $WORKERS TPU VM worker(s), one msf_jax process each;" \
    "runtime $RUNTIME_VERSION; $capacity; workdir $WORKDIR"
}

gcloud_tpus() {  # GROUP SUBCOMMAND ARGS...: gcloud compute tpus GROUP ... in PROJECT and ZONE
  local group=$1 subcommand=$2
  shift 2
  run "$GCLOUD" compute tpus "$group" "$subcommand" "$@" --project="$PROJECT" --zone="$ZONE"
}

on_workers() {  # WORKERS COMMAND: runs COMMAND on the workers ('all' or an index)
  gcloud_tpus tpu-vm ssh "$TPU_NAME" --worker="$1" --command="$2"
}

create_slice() {
  local spot=()
  ((SPOT)) && spot=(--spot)
  if ((QUEUED)); then
    gcloud_tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot[@]}"
  else
    gcloud_tpus tpu-vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${spot[@]}"
  fi
}

delete_slice() {
  if ((QUEUED)); then  # --force deletes the node first
    gcloud_tpus queued-resources delete "$QUEUED_RESOURCE" --force --quiet
  else
    gcloud_tpus tpu-vm delete "$TPU_NAME" --quiet
  fi
}

# The state of a TPU VM node or a queued resource as one word: gcloud's (READY, PREEMPTED,
# ACTIVE, SUSPENDED, ...), NOT_FOUND, or UNKNOWN when gcloud failed for another reason.
describe_state() {  # GROUP NAME FIELD
  local out
  if out=$("$GCLOUD" compute tpus "$1" describe "$2" --project="$PROJECT" --zone="$ZONE" \
    --format="value($3)" 2>&1); then
    out=$(grep -v '^[[:space:]]*$' <<< "$out" | tail -n 1)  # warnings come before the value
    echo "${out:-UNKNOWN}"
  elif [[ $out == *NOT_FOUND* ]]; then
    echo NOT_FOUND
  else
    note "gcloud describe $2 failed: $(tail -n 1 <<< "$out")"
    echo UNKNOWN
  fi
}

slice_state() {
  local request
  if ((QUEUED)); then
    request=$(describe_state queued-resources "$QUEUED_RESOURCE" state.state)
    # Until the request is ACTIVE its node does not exist; then the node's state counts.
    [[ $request == ACTIVE ]] || { echo "$request"; return; }
  fi
  local node
  node=$(describe_state tpu-vm "$TPU_NAME" state)
  # An ACTIVE request whose node is not visible yet is not a lost slice: recreating the
  # request would give its capacity away.
  if ((QUEUED)) && [[ $node == NOT_FOUND ]]; then
    node=ACTIVE
  fi
  echo "$node"
}

# --- The plan, on this machine ------------------------------------------------------------

# Compiles the train step and the kNN monitor's feature step for ACCELERATOR_TYPE here and
# stops when they do not fit its chips: an out-of-memory error on a slice is the most
# expensive way to find that out. Plans are cached by config and slice: a rerun is instant.
plan_first() {  # ARGS...: the run's arguments; their --config.* overrides are planned too
  ((NO_PLAN)) && return 0
  local python=${PLAN_PYTHON:-$repo/.venv/bin/python} overrides=() arg
  [[ -x $python ]] || python=python3
  for arg in "$@"; do
    [[ $arg == --config.* ]] && overrides+=("$arg")
  done
  local plan=("$python" -m msf_jax.plan --config="$CONFIG" --topology="$ACCELERATOR_TYPE"
    "--programs=train,features" "${overrides[@]}")
  if ((DRY_RUN)); then
    echo "# plan: does $CONFIG fit $ACCELERATOR_TYPE? Refused if not (--no-plan skips it)"
    command_line "${plan[@]}"
    return 0
  fi
  if ! (cd "$repo" && "$python" -c 'import libtpu, msf_jax' 2> /dev/null); then
    note "Not planning: no libtpu here (pip install \"jax[tpu]==0.10.2\"; none exists for" \
      "macOS). Going on without a plan."
    return 0
  fi
  note "Planning $CONFIG on $ACCELERATOR_TYPE here (minutes the first time, cached after)."
  (cd "$repo" && "${plan[@]}") || die "The plan above refuses this run on $ACCELERATOR_TYPE:" \
    "change the config or the slice, or pass --no-plan to start anyway."
}

# --- The code and the run on the workers ----------------------------------------------------

resolve_commit() {  # fixed once, so that every restart of a supervised run ships the same code
  if [[ -z $COMMIT ]]; then
    COMMIT=$(git -C "$repo" rev-parse HEAD 2> /dev/null) ||
      die "setup ships a commit of this repository: run it from a git clone, or set COMMIT."
  fi
  if ! git -C "$repo" diff-index --quiet HEAD -- 2> /dev/null; then
    note "Warning: this checkout has uncommitted changes; the workers get commit $COMMIT only."
  fi
}

# Ships `git archive COMMIT` (committed files only) and installs Python 3.11 and .venv
# (launch/install.sh tpu) on every worker. A fresh slice needs it; it takes a few minutes.
setup_workers() {
  local archive="${TMPDIR:-/tmp}/msf_jax-${COMMIT:0:12}.tar.gz" status=0
  # apt waits for the boot-time unattended upgrades instead of failing on their lock.
  local apt='sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq -y'
  local install="$apt update && $apt install python3.11 python3.11-venv && rm -rf $REMOTE_DIR"
  install+=" && tar xzf $REMOTE_DIR.tar.gz && $REMOTE_DIR/launch/install.sh tpu"
  {
    run git -C "$repo" archive --format=tar.gz --prefix="$REMOTE_DIR/" -o "$archive" \
      "$COMMIT" &&
      gcloud_tpus tpu-vm scp "$archive" "$TPU_NAME:$REMOTE_DIR.tar.gz" --worker=all &&
      on_workers all "$install"
  } || status=$?
  ((DRY_RUN)) || rm -f "$archive"
  return "$status"
}

# The shell line that starts `msf_jax.main ARGS` on a worker (worker_run.sh detaches it).
# MSF_JAX_RUN_ID names the run across restarts: a recreated slice takes over the workdir's
# lock at once instead of waiting for the preempted holder's heartbeat to go stale.
remote_job() {  # NAME ARGS...
  local name=$1
  shift
  echo "cd $REMOTE_DIR && $(command_line env "MSF_JAX_RUN_ID=$RUN_ID" launch/worker_run.sh \
    start "$name" "$WORKDIR/logs" -- .venv/bin/python -m msf_jax.main "$@")"
}

start_train() {
  on_workers all "$(remote_job train --config="$CONFIG" --workdir="$WORKDIR" \
    --config.data.data_dir="$DATA_DIR" "$@")"
}

start_eval() {
  on_workers all "$(remote_job eval --config=configs/eval.py:imagenet \
    --config.checkpoint="$WORKDIR" --workdir="$EVAL_WORKDIR" \
    --config.data.data_dir="$DATA_DIR" "$@")"
}

remote_status_command() {  # NAME: prints the run's status word on a worker (none before setup)
  echo "if [ -x $REMOTE_DIR/launch/worker_run.sh ]; then $REMOTE_DIR/launch/worker_run.sh" \
    "status $1; else echo none; fi"
}

training_status() {  # [NAME]: the word worker_run.sh reports on worker 0, or 'unknown'
  local out
  out=$(on_workers 0 "$(remote_status_command "${1:-train}")" 2> /dev/null) || out=''
  out=$(grep -v '^[[:space:]]*$' <<< "$out" | tail -n 1) || true
  echo "${out:-unknown}"
}

show_status() {
  if ((DRY_RUN)); then
    command_line "$GCLOUD" compute tpus tpu-vm describe "$TPU_NAME" --project="$PROJECT" \
      --zone="$ZONE" --format='value(state)'
    on_workers 0 "$(remote_status_command train)"
    return
  fi
  local state
  state=$(slice_state)
  echo "slice $TPU_NAME: $state"
  if [[ $state == READY ]]; then
    echo "train: $(training_status train)"
    echo "eval: $(training_status eval)"
  fi
}

show_tensorboard() {
  local binary=tensorboard
  [[ -x $repo/.venv/bin/tensorboard ]] && binary=$repo/.venv/bin/tensorboard
  note "TensorBoard reads $WORKDIR with your gcloud application-default credentials."
  run "$binary" --logdir="$WORKDIR"
}

# --- The supervisor -------------------------------------------------------------------------

RESTARTS=0
SEEN_SLICE=0  # NOT_FOUND counts as a restart only once the slice has existed

count_restart() {  # REASON: one more recovery; gives up past MAX_RESTARTS
  RESTARTS=$((RESTARTS + 1))
  if ((RESTARTS > MAX_RESTARTS)); then
    die "Giving up after $MAX_RESTARTS restarts ($1). Nothing was deleted; the run resumes" \
      "from its last checkpoint when you start supervise again."
  fi
  note "Restart $RESTARTS of at most $MAX_RESTARTS: $1."
}

# After training ended: an idle slice costs as much as a busy one, and everything worth
# keeping is in the bucket, so the slice goes unless KEEP_SLICE=1.
finish() {
  if ((KEEP_SLICE)); then
    note "Keeping $TPU_NAME (KEEP_SLICE=1): it costs until you run delete."
  else
    note "Deleting $TPU_NAME: the checkpoints, metrics and logs are in $WORKDIR."
    delete_slice || note "Deleting $TPU_NAME failed: run 'launch/tpu_pod.sh delete'."
  fi
}

recreate() {  # STATE: the slice is gone or preempted
  if [[ $1 != NOT_FOUND ]]; then
    delete_slice || note "Deleting $TPU_NAME failed; creating it anyway."
  fi
  create_slice || note "Creating $TPU_NAME failed (no capacity?); trying again in ${POLL_SECONDS}s."
}

start_training() {  # NEEDS_SETUP ARGS...
  local needs_setup=$1
  shift
  if ((needs_setup)); then
    setup_workers || return
  fi
  start_train "$@"
}

# One look at the slice and what it calls for. Returns 0 to go on, ENDED_FINISHED or
# ENDED_FAILED when training has ended.
ENDED_FINISHED=10
ENDED_FAILED=11
supervise_step() {  # ARGS...
  local state status
  state=$(slice_state)
  case $state in
    READY)
      SEEN_SLICE=1
      status=$(training_status)
      case $status in
        running) note "$TPU_NAME: training runs." ;;
        finished) note "Training finished."; return "$ENDED_FINISHED" ;;
        failed*) note "Training failed ($status): its log is in $WORKDIR/logs."
          return "$ENDED_FAILED" ;;
        none) note "Setting up $TPU_NAME and starting training."
          start_training 1 "$@" || count_restart "starting training failed" ;;
        stopped) count_restart "training stopped on a SIGTERM"
          start_training 0 "$@" || note "Starting training failed." ;;
        *) note "Worker 0 did not answer ($status); looking again later." ;;
      esac ;;
    PREEMPTED | TERMINATED | STOPPED | SUSPENDED | FAILED | NOT_FOUND)
      if ((SEEN_SLICE)) || [[ $state != NOT_FOUND ]]; then
        count_restart "$TPU_NAME is $state"
      else
        note "$TPU_NAME does not exist yet: creating it."
      fi
      SEEN_SLICE=1
      recreate "$state" ;;
    *) note "$TPU_NAME is $state: waiting." ;;
  esac
  return 0
}

supervise_plan() {  # --dry-run: the commands of each case, without polling
  echo "# every ${POLL_SECONDS}s: the slice's state"
  command_line "$GCLOUD" compute tpus tpu-vm describe "$TPU_NAME" --project="$PROJECT" \
    --zone="$ZONE" --format='value(state)'
  echo "# READY: the training's status on worker 0"
  on_workers 0 "$(remote_status_command train)"
  echo "# PREEMPTED, TERMINATED or gone (at most $MAX_RESTARTS times): recreate, set up, train"
  delete_slice
  create_slice
  setup_workers
  start_train "$@"
  echo "# training finished or failed: delete the slice (unless KEEP_SLICE=1)"
  ((KEEP_SLICE)) || delete_slice
}

supervise() {
  if ((DRY_RUN)); then
    supervise_plan "$@"
    return
  fi
  local outcome
  note "Supervising $TPU_NAME: a look every ${POLL_SECONDS}s, at most $MAX_RESTARTS restarts."
  while :; do
    outcome=0
    supervise_step "$@" || outcome=$?
    if ((outcome == ENDED_FINISHED || outcome == ENDED_FAILED)); then
      finish
      return $((outcome == ENDED_FAILED))
    fi
    ((outcome == 0)) || note "Unexpected error ($outcome); looking again later."
    sleep "$POLL_SECONDS"
  done
}

# --- Main -----------------------------------------------------------------------------------

main() {
  take_dry_run "$@"
  take_switch --no-plan "${ARGS[@]}"
  NO_PLAN=$TAKEN
  set -- "${ARGS[@]}"
  local command=${1:-}
  [[ -n $command ]] || usage
  shift
  case $command in
    create | setup | train | supervise | status | tensorboard | evaluate | delete) ;;
    logs | stop) [[ ${1:-train} == train || $1 == eval ]] || usage ;;
    -h | --help) usage 0 ;;
    *) echo "$0: unknown command '$command'." >&2; usage ;;
  esac
  check_settings
  resolve_accelerator
  ((DRY_RUN)) && describe_plan
  case $command in
    create) plan_first; create_slice ;;
    setup) resolve_commit; setup_workers ;;
    train) plan_first "$@"; start_train "$@" ;;
    supervise) plan_first "$@"; resolve_commit; supervise "$@" ;;
    status) show_status ;;
    logs) on_workers 0 "tail -n 100 -F ~/msf_${1:-train}.log" ;;
    tensorboard) show_tensorboard ;;
    evaluate) start_eval "$@" ;;
    stop) on_workers all "$REMOTE_DIR/launch/worker_run.sh stop ${1:-train}" ;;
    delete) delete_slice ;;
  esac
}

main "$@"
