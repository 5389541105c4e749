# shellcheck shell=bash
# Helpers that the launch scripts source: the --dry-run switch, printing a command exactly as
# it would run, and error messages. Sourcing it runs nothing.

DRY_RUN=0
ARGS=()
TAKEN=0

# Removes the switch SWITCH from the arguments that follow it: TAKEN=1 when it was there,
# ARGS holds the rest. It may come anywhere; msf_jax.main has no flag of such a name, so none
# is taken from its arguments.
take_switch() {  # SWITCH ARGS...
  local switch=$1 arg
  shift
  TAKEN=0
  ARGS=()
  for arg in "$@"; do
    if [[ $arg == "$switch" ]]; then
      TAKEN=1
    else
      ARGS+=("$arg")
    fi
  done
}

# --dry-run: DRY_RUN=1 when it was there, ARGS holds the rest (use: take_dry_run "$@";
# set -- "${ARGS[@]}"), so that `tpu_pod.sh create --dry-run` works as well as
# `tpu_pod.sh --dry-run create`.
take_dry_run() {
  take_switch --dry-run "$@"
  DRY_RUN=$TAKEN
}

# One word as it must be typed in a shell: bare when nothing in it is special, else in single
# quotes (only the value of a --flag=value). The dry-run output can then be pasted into a
# terminal and runs the same command.
shell_quote() {
  local safe='^[A-Za-z0-9_./:=@%+,-]+$'
  if [[ $1 =~ $safe ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    shell_quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# A command line, every word quoted as needed.
command_line() {
  local word line=''
  for word in "$@"; do
    line+="${line:+ }$(shell_quote "$word")"
  done
  printf '%s\n' "$line"
}

# Runs a command, or under --dry-run prints it instead (on stdout, one line).
run() {
  if ((DRY_RUN)); then
    command_line "$@"
  else
    "$@"
  fi
}

note() {  # a progress message, on stderr so that stdout stays the commands under --dry-run
  echo "[$(date -u +%H:%M:%S)] $*" >&2
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 1
}
