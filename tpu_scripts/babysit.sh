#!/usr/bin/env bash
# babysit.sh NAME --type TYPE --zone ZONE --run RUN [--spot | --preemptible | --on-demand] [--queued]
#            [--retries N] [--poll SECONDS] [--backoff SECONDS] [--dry-run] -- COMMAND...
#
# Keeps a run going on spot/preemptible TPUs until it finishes: creates the TPU if needed, sets it up,
# launches COMMAND on every worker, then watches. When the VM is preempted or deleted it is recreated
# (and set up again); when the job exits 75 (stopped with a checkpoint) it is relaunched; either way
# the run resumes from its last checkpoint (use a gs:// workdir: a new VM has an empty disk). Exit 0
# ends it; any other exit code is a failure and stops it. Backoff doubles per retry, up to N retries.
source "$(dirname "$0")/common.sh"
if wants_help "$@"; then sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
here="$(dirname "$0")"

split_command "$@"
parse_common "${BEFORE[@]+"${BEFORE[@]}"}"
TYPE="" RUN="" PRICING=(--on-demand) QUEUED=() RETRIES=20 POLL=60 BACKOFF=30
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) TYPE="$2"; shift 2 ;;
    --run) RUN="$2"; shift 2 ;;
    --spot|--preemptible|--on-demand) PRICING=("$1"); shift ;;
    --queued) QUEUED=(--queued); shift ;;
    --retries) RETRIES="$2"; shift 2 ;;
    --poll) POLL="$2"; shift 2 ;;
    --backoff) BACKOFF="$2"; shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$TYPE" ]] || die "--type is required (e.g. --type v4-32)"
runtime_for "$TYPE" > /dev/null
[[ -n "$RUN" ]] || die "--run NAME is required"
[[ ${#COMMAND[@]} -gt 0 ]] || die "the command to run goes after '--'"
common=("$NAME" --zone "$ZONE")
[[ "$DRY_RUN" == 1 ]] && common+=(--dry-run)

tpu_state() { if [[ ${#QUEUED[@]} -gt 0 ]]; then queued_state; else vm_state; fi; }
job_exit() {
  query 0 gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=0 \
    --command "cat ~/$LOG_DIR/$RUN.exit 2>/dev/null || true"
}

retries=0
retry() {  # why
  retries=$((retries + 1))
  [[ "$retries" -le "$RETRIES" ]] || die "$1; gave up after $RETRIES retries"
  local wait=$((BACKOFF * (1 << (retries - 1 < 6 ? retries - 1 : 6))))
  echo "babysit: $1; retry $retries of $RETRIES in ${wait}s"
  sleep "$wait"
}

fresh=1
while true; do
  state="$(tpu_state)"
  case "$state" in
    READY|ACTIVE) ;;
    NOT_FOUND)
      "$here/create.sh" "${common[@]}" --type "$TYPE" "${PRICING[@]}" "${QUEUED[@]+"${QUEUED[@]}"}" --poll "$POLL" \
        || { retry "could not create $NAME"; continue; }
      fresh=1 ;;
    CREATING|STARTING|PROVISIONING|WAITING_FOR_RESOURCES|ACCEPTED|RESTARTING)
      sleep "$POLL"; continue ;;
    *)  # PREEMPTED, TERMINATED, FAILED, SUSPENDED, ...: it will not come back by itself
      "$here/delete.sh" "${common[@]}" "${QUEUED[@]+"${QUEUED[@]}"}" || true
      retry "$NAME is $state"
      continue ;;
  esac
  if [[ "$fresh" == 1 ]]; then
    "$here/setup.sh" "${common[@]}"
    fresh=0
  fi
  "$here/launch.sh" "${common[@]}" --run "$RUN" -- "${COMMAND[@]}"
  while true; do
    sleep "$POLL"
    state="$(tpu_state)"
    if [[ "$state" != READY && "$state" != ACTIVE ]]; then
      reason="$NAME became $state"
      break
    fi
    code="$(job_exit | tr -d '[:space:]')"
    case "$code" in
      "") continue ;;
      0) echo "babysit: $RUN finished"; exit 0 ;;
      75) reason="$RUN stopped with a checkpoint (exit 75)"; break ;;
      *) die "$RUN failed with exit code $code; see $here/logs.sh $NAME --zone $ZONE --run $RUN" ;;
    esac
  done
  retry "$reason"
done
