#!/usr/bin/env bash
# Runs one command (msf_jax.main) on a TPU VM worker, detached from the ssh session that
# started it, and keeps a record that outlives the command: its log (copied to the bucket
# as it grows, since a preempted VM takes its disk along) and a one-word status that
# `tpu_pod.sh supervise` reads to decide what to do next. tpu_pod.sh runs it on every
# worker; there is no need to call it by hand.
#
#   launch/worker_run.sh [--dry-run] start NAME LOG_DIR -- COMMAND...   # returns at once
#   launch/worker_run.sh status NAME    # none | running | finished | stopped | failed:CODE
#   launch/worker_run.sh stop NAME      # SIGTERM: the run saves a checkpoint, then exits
#
# NAME names the files in the home directory (msf_NAME.log, .status, .pid); LOG_DIR is a
# gs:// folder for the log ('' keeps it local only). --dry-run prints the detached command.
# "stopped" means the command exited after a SIGTERM (it resumes when started again);
# "finished" that it exited 0 on its own.
set -euo pipefail

GCLOUD=${GCLOUD:-gcloud}
UPLOAD_SECONDS=${UPLOAD_SECONDS:-120}
STATE_DIR=${STATE_DIR:-$HOME}
# What msf_jax's training loop logs when a SIGTERM stopped it after saving (train_loop.py):
# its exit status is 0 then, as for a finished run.
STOP_MESSAGE='the run resumes from here'

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$here/common.sh"

usage() {
  cat >&2 << EOF
usage: $0 [--dry-run] start NAME LOG_DIR -- COMMAND...
       $0 status NAME
       $0 stop NAME
EOF
  exit 2
}

file() {  # NAME SUFFIX: this job's file in STATE_DIR
  echo "$STATE_DIR/msf_$1.$2"
}

write_status() {  # NAME WORD: replaced in one step, so that a reader never sees it empty
  local path
  path=$(file "$1" status)
  echo "$2" > "$path.tmp"
  mv -f "$path.tmp" "$path"
}

alive() {  # NAME: whether the job's wrapper process still runs (or is being started)
  local pid
  # `start` writes the status before the pid, so a missing pid means "starting".
  pid=$(cat "$(file "$1" pid)" 2> /dev/null) || return 0
  kill -0 "$pid" 2> /dev/null
}

status() {
  local name=$1 state
  state=$(cat "$(file "$name" status)" 2> /dev/null) || state=none
  # A wrapper killed outright (SIGKILL, out of memory) leaves "running" behind.
  if [[ $state == running ]] && ! alive "$name"; then
    state=failed:lost
  fi
  echo "$state"
}

exit_status_word() {  # NAME CODE: the status word for the command's exit status
  local name=$1 code=$2
  if ((code == 0)) && grep -q "$STOP_MESSAGE" "$(file "$name" log)"; then
    echo stopped
  elif ((code == 0)); then
    echo finished
  elif ((code == 143)); then  # killed by SIGTERM before the loop's handler was in place
    echo stopped
  else
    echo "failed:$code"
  fi
}

upload_log() {  # NAME LOG_URL
  [[ -n $2 ]] || return 0
  "$GCLOUD" storage cp "$(file "$1" log)" "$2" > /dev/null 2>&1 || true
}

wait_for_exit() {  # PID: its exit status; a trapped signal interrupts `wait`, so wait again
  while kill -0 "$1" 2> /dev/null; do
    wait "$1" || true
  done
  wait "$1"
}

# The detached part: runs the command, forwards SIGTERM to it, records how it ended.
supervised_run() {
  local name=$1 log_url=$2 child uploader code=0
  shift 2
  echo $$ > "$(file "$name" pid)"  # this process: `stop` signals it, `alive` checks it
  "$@" > "$(file "$name" log)" 2>&1 < /dev/null &
  child=$!
  trap 'kill -TERM "$child" 2> /dev/null || true' TERM
  if [[ -n $log_url ]]; then
    while sleep "$UPLOAD_SECONDS"; do upload_log "$name" "$log_url"; done &
    uploader=$!
  fi
  wait_for_exit "$child" || code=$?
  [[ -z ${uploader:-} ]] || kill "$uploader" 2> /dev/null || true
  upload_log "$name" "$log_url"
  write_status "$name" "$(exit_status_word "$name" "$code")"
}

start() {
  local name=$1 log_dir=$2 log_url=''
  shift 2
  [[ ${1:-} == -- ]] || usage
  shift
  (($#)) || usage
  if [[ -n $log_dir ]]; then
    log_url="$log_dir/$name-$(date -u +%Y%m%dT%H%M%SZ)-$(hostname).log"
  fi
  local detached=(setsid nohup "$here/worker_run.sh" _run "$name" "$log_url" "$@")
  if ((DRY_RUN)); then
    command_line "${detached[@]}"
    return
  fi
  if [[ $(status "$name") == running ]]; then
    die "$name is already running here: stop it first (worker_run.sh stop $name)."
  fi
  rm -f "$(file "$name" pid)"
  write_status "$name" running
  "${detached[@]}" > /dev/null 2>&1 < /dev/null &
  echo $! > "$(file "$name" pid)"
  echo "$(hostname): started $name (log $(file "$name" log)${log_url:+, copied to $log_url})"
}

stop() {
  local name=$1
  if [[ $(status "$name") == running ]]; then
    kill -TERM "$(cat "$(file "$name" pid)" 2> /dev/null)" 2> /dev/null ||
      die "$name is still starting: try again in a moment."
    echo "$(hostname): sent SIGTERM to $name; it saves a checkpoint and exits."
  else
    echo "$(hostname): $name is not running."
  fi
}

main() {
  take_dry_run "$@"
  set -- "${ARGS[@]}"
  local command=${1:-}
  (($# >= 2)) || usage
  shift
  [[ $1 =~ ^[a-z0-9_]+$ ]] || usage  # NAME goes into file names
  case $command in
    start) (($# >= 4)) || usage; start "$@" ;;
    status) status "$1" ;;
    stop) stop "$1" ;;
    _run) supervised_run "$@" ;;
    *) usage ;;
  esac
}

main "$@"
