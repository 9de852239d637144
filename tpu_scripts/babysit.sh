#!/usr/bin/env bash
# babysit.sh NAME --type TYPE --zone ZONE --run RUN [--spot | --preemptible | --on-demand] [--queued]
#            [--retries N] [--poll SECONDS] [--backoff SECONDS] [--dry-run] -- COMMAND...
#
# Keeps a run going on spot/preemptible TPUs until it finishes: creates the TPU if needed, sets it up,
# launches COMMAND on every worker, then watches. When the VM is preempted or deleted it is recreated
# (and set up again); when the job exits 75 (stopped with a checkpoint) or is gone without an exit code
# it is relaunched; either way the run resumes from its last checkpoint (use a gs:// workdir: a new VM
# has an empty disk). Exit 0 ends it; any other exit code is a failure and stops it. Backoff doubles per
# retry, up to N retries. Only a VM babysit created is ever deleted, and only once it is preempted or
# terminated (a queued resource: failed or suspended); a STOPPED VM, or a preempted one it did not
# create, stops it with what to do. A job already running when it starts is watched, not relaunched; a
# gcloud or ssh failure is asked again, never taken for an answer.
source "$(dirname "$0")/common.sh"
if wants_help "$@"; then usage; exit 0; fi
here="$(dirname "$0")"

split_command "$@"
parse_common "${BEFORE[@]+"${BEFORE[@]}"}"
TYPE="" RUN="" PRICING=(--on-demand) QUEUED=() RETRIES=20 POLL=60 BACKOFF=30
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) need_value "$@"; TYPE="$2"; shift 2 ;;
    --run) need_value "$@"; RUN="$2"; shift 2 ;;
    --spot|--preemptible|--on-demand) PRICING=("$1"); shift ;;
    --queued) QUEUED=(--queued); shift ;;
    --retries) need_value "$@"; need_int "$1" "$2"; RETRIES="$2"; shift 2 ;;
    --poll) need_value "$@"; need_int "$1" "$2"; POLL="$2"; shift 2 ;;
    --backoff) need_value "$@"; need_int "$1" "$2"; BACKOFF="$2"; shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$TYPE" ]] || die "--type is required (e.g. --type v4-32)"
runtime_for "$TYPE" > /dev/null
[[ -n "$RUN" ]] || die "--run NAME is required"
check_run_name "$RUN"
[[ ${#COMMAND[@]} -gt 0 ]] || die "the command to run goes after '--'"
common=("$NAME" --zone "$ZONE")
[[ "$DRY_RUN" == 1 ]] && common+=(--dry-run)

tpu_state() { if [[ ${#QUEUED[@]} -gt 0 ]]; then queued_state; else vm_state; fi; }
# The job on worker 0: its exit code, RUNNING (its recorded pid is alive), NONE (neither: killed, or
# the VM restarted), or UNREACHABLE (ssh failed 3 times).
job_state() {
  local log="\$HOME/$LOG_DIR/$RUN" out try  # $HOME of the worker
  for try in 1 2 3; do
    if out="$(query RUNNING gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=0 --command \
        "if [ -f $log.exit ]; then cat $log.exit; elif [ -f $log.pid ] && kill -0 \$(cat $log.pid) 2>/dev/null; \
then echo RUNNING; else echo NONE; fi")"; then
      echo "$out" | tr -d '[:space:]'
      return
    fi
    [[ "$try" == 3 ]] || sleep "$QUERY_RETRY_SECONDS"
  done
  echo UNREACHABLE
}

retries=0
retry() {  # why
  retries=$((retries + 1))
  [[ "$retries" -le "$RETRIES" ]] || die "$1; gave up after $RETRIES retries"
  local wait=$((BACKOFF * (1 << (retries - 1 < 6 ? retries - 1 : 6))))
  echo "babysit: $1; retry $retries of $RETRIES in ${wait}s"
  sleep "$wait"
}

fresh=1 created=0 adopt=1
while true; do
  state="$(tpu_state)"
  case "$state" in
    READY|ACTIVE) ;;
    NOT_FOUND)
      "$here/create.sh" "${common[@]}" --type "$TYPE" "${PRICING[@]}" "${QUEUED[@]+"${QUEUED[@]}"}" --poll "$POLL" \
        || { retry "could not create $NAME"; continue; }
      created=1 fresh=1 adopt=0 ;;
    UNKNOWN)
      echo "babysit: could not read $NAME's state; asking again in ${POLL}s"
      sleep "$POLL"; continue ;;
    PREEMPTED|TERMINATED|FAILED|SUSPENDED)
      [[ "$created" == 1 ]] || die "$NAME is $state and babysit did not create it: delete it ($here/delete.sh \
$NAME --zone $ZONE${QUEUED[*]+ ${QUEUED[*]}}) and run babysit again, which then creates it and looks after it"
      echo "babysit: $NAME is $state; deleting it (babysit created it) to create it again"
      "$here/delete.sh" "${common[@]}" "${QUEUED[@]+"${QUEUED[@]}"}" || true
      retry "$NAME was $state"
      continue ;;
    STOPPED)
      die "$NAME is STOPPED: babysit does not start or delete a stopped VM; start it (gcloud compute tpus \
tpu-vm start $NAME --zone $ZONE) or delete it, then run babysit again" ;;
    *)  # CREATING, STARTING, REPAIRING, WAITING_FOR_RESOURCES, DELETING, ...: it moves on by itself
      echo "babysit: $NAME is $state; waiting"
      sleep "$POLL"; continue ;;
  esac
  running=0  # a job already running when babysit starts is watched: no setup under it, no relaunch over it
  [[ "$adopt" == 1 && "$(job_state)" == RUNNING ]] && running=1
  if [[ "$fresh" == 1 && "$running" == 0 ]]; then
    "$here/setup.sh" "${common[@]}"
  fi
  fresh=0
  if [[ "$running" == 1 ]]; then
    echo "babysit: $RUN is already running on $NAME; watching it"
  else
    "$here/launch.sh" "${common[@]}" --run "$RUN" -- "${COMMAND[@]}"
  fi
  adopt=0
  while true; do
    sleep "$POLL"
    state="$(tpu_state)"
    [[ "$state" == UNKNOWN ]] && continue  # said on stderr; the next poll asks again
    if [[ "$state" != READY && "$state" != ACTIVE ]]; then
      reason="$NAME became $state"
      break
    fi
    code="$(job_state)"
    case "$code" in
      RUNNING) continue ;;
      UNREACHABLE) echo "babysit: no answer from $NAME's worker 0 over ssh (3 tries); asking again in ${POLL}s"
        continue ;;
      NONE) reason="$RUN is not running and left no exit code (killed, or the VM restarted)"; break ;;
      0) echo "babysit: $RUN finished"; exit 0 ;;
      75) reason="$RUN stopped with a checkpoint (exit 75)"; break ;;
      *) die "$RUN failed with exit code $code; see $here/logs.sh $NAME --zone $ZONE --run $RUN" ;;
    esac
  done
  retry "$reason"
done
