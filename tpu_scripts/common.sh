# shellcheck shell=bash
# Sourced by every script here: argument parsing, the dry-run switch, TPU types and gcloud calls.
# Only GA `gcloud compute tpus` commands are used. DRY_RUN=1 (or --dry-run) prints each gcloud
# command instead of running it.
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
ZONE=""
NAME=""
# shellcheck disable=SC2034  # used by the scripts that source this file
REMOTE_DIR="jaxtune"     # on every worker: ~/jaxtune (code), ~/venv, ~/logs
# shellcheck disable=SC2034
LOG_DIR="logs"

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# Print a command as a shell would read it back (for --dry-run and logs).
quoted() {
  local out="" arg
  for arg in "$@"; do out+="$(printf '%q' "$arg") "; done
  echo "${out% }"
}

# Run a command, or print it with --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quoted "$@")"
  else
    "$@"
  fi
}

# A query whose output the script reads (state polls): in a dry run, print it and answer $2.
query() {
  local dry_answer="$1"
  shift
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quoted "$@")" >&2
    echo "$dry_answer"
  else
    "$@"
  fi
}

# The runtime image a TPU type boots (Cloud TPU docs); unknown types are refused.
runtime_for() {
  case "$1" in
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "unknown TPU type '$1' (expected e.g. v2-8, v3-8, v4-32, v5litepod-16, v5p-8, v6e-8)" ;;
  esac
}

# Options every script takes: NAME first, then --zone Z and --dry-run; the rest is left in ARGS.
parse_common() {
  ARGS=()
  [[ $# -gt 0 && "$1" != -* ]] || die "the TPU name comes first (see --help)"
  NAME="$1"
  shift
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --zone) [[ $# -ge 2 ]] || die "--zone needs a value"; ZONE="$2"; shift 2 ;;
      --zone=*) ZONE="${1#*=}"; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      *) ARGS+=("$1"); shift ;;
    esac
  done
  [[ -n "$ZONE" ]] || die "--zone is required (e.g. --zone us-central2-b)"
}

# Split "OPTIONS -- COMMAND..." into BEFORE (the options) and COMMAND (what runs on the workers).
split_command() {
  BEFORE=() COMMAND=()
  while [[ $# -gt 0 ]]; do
    # shellcheck disable=SC2034  # read by the calling script
    if [[ "$1" == "--" ]]; then shift; COMMAND=("$@"); return; fi
    BEFORE+=("$1"); shift
  done
}

# `--opt VALUE` with VALUE missing (or another option): one line instead of "$2: unbound variable".
need_value() {
  [[ $# -ge 2 && "$2" != --* ]] || die "$1 needs a value"
}

# A run name becomes a tmux session and file names on every worker: plain characters only.
check_run_name() {
  [[ "$1" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run '$1': use letters, digits, '.', '_' or '-'"
}

# An option that takes a count or seconds: digits only.
need_int() {
  [[ "$2" =~ ^[0-9]+$ ]] || die "$1 '$2': expected a whole number"
}

# --help: the comment block at the top of the script, without its '#'s.
usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

wants_help() {
  local arg
  for arg in "$@"; do
    [[ "$arg" == "--" ]] && return 1
    [[ "$arg" == "-h" || "$arg" == "--help" ]] && return 0
  done
  return 1
}

# The same command on every worker of the TPU VM, at once.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"
}

# The state a `describe` prints (DRY_ANSWER in a dry run). NOT_FOUND only when gcloud says the resource
# does not exist; when it fails for another reason (network, credentials, an API hiccup) it is asked
# again, and after 3 failures the answer is UNKNOWN: never a reason to create, delete or launch.
QUERY_RETRY_SECONDS="${QUERY_RETRY_SECONDS:-10}"
describe_state() {
  local dry_answer="$1" out err try
  shift
  if [[ "$DRY_RUN" == 1 ]]; then query "$dry_answer" "$@"; return; fi
  err="$(mktemp)"
  for try in 1 2 3; do
    if out="$("$@" 2>"$err")"; then rm -f "$err"; echo "$out"; return; fi
    if grep -q "NOT_FOUND" "$err"; then rm -f "$err"; echo NOT_FOUND; return; fi
    [[ "$try" == 3 ]] || sleep "$QUERY_RETRY_SECONDS"
  done
  echo "$(basename "$0"): gcloud failed 3 times: $(tail -n 1 "$err")" >&2
  rm -f "$err"
  echo UNKNOWN
}

# READY / CREATING / PREEMPTED / ... of a TPU VM, NOT_FOUND, or UNKNOWN.
vm_state() {
  describe_state READY gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" --format='value(state)'
}

# ACTIVE / WAITING_FOR_RESOURCES / FAILED / SUSPENDED / ... of a queued resource, NOT_FOUND, or UNKNOWN.
queued_state() {
  describe_state ACTIVE gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" \
    --format='value(state.state)'
}
