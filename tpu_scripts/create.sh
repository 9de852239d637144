#!/usr/bin/env bash
# create.sh NAME --type TYPE --zone ZONE [--spot | --preemptible | --on-demand] [--queued] [--poll SECONDS]
#           [--timeout SECONDS] [--dry-run]
#
# Creates a TPU VM (or, with --queued, a queued resource that waits for capacity) with the runtime
# image its type needs, and waits until it is READY (ACTIVE). A VM preempted, terminated or failed
# before it was ready, or a queued resource that ends FAILED or SUSPENDED, is deleted (this script
# created it) and the script exits 1, so that a caller (babysit.sh) can ask again; so is one not ready
# after --timeout seconds (default 3600 for a VM; 0, no limit, for a queued resource, which may wait
# for capacity for hours).
source "$(dirname "$0")/common.sh"
if wants_help "$@"; then usage; exit 0; fi

parse_common "$@"
TYPE="" PRICING="on-demand" QUEUED=0 POLL=30 TIMEOUT=""
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) need_value "$@"; TYPE="$2"; shift 2 ;;
    --type=*) TYPE="${1#*=}"; shift ;;
    --spot) PRICING="spot"; shift ;;
    --preemptible) PRICING="preemptible"; shift ;;
    --on-demand) PRICING="on-demand"; shift ;;
    --queued) QUEUED=1; shift ;;
    --poll) need_value "$@"; need_int "$1" "$2"; POLL="$2"; shift 2 ;;
    --timeout) need_value "$@"; need_int "$1" "$2"; TIMEOUT="$2"; shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$TYPE" ]] || die "--type is required (e.g. --type v4-32)"
VERSION="$(runtime_for "$TYPE")"
[[ -n "$TIMEOUT" ]] || TIMEOUT=$((QUEUED ? 0 : 3600))
deadline=$((SECONDS + TIMEOUT))
overdue() { [[ "$TIMEOUT" != 0 && "$SECONDS" -ge "$deadline" ]]; }

if [[ "$QUEUED" == 1 ]]; then
  [[ "$PRICING" != "preemptible" ]] || die "queued resources are --spot or --on-demand (preemptible is the older VM-only kind)"
  flags=()
  [[ "$PRICING" == "spot" ]] && flags=(--spot)
  run gcloud compute tpus queued-resources create "$NAME" --node-id "$NAME" --zone "$ZONE" \
    --accelerator-type "$TYPE" --runtime-version "$VERSION" "${flags[@]+"${flags[@]}"}"
  while true; do
    state="$(queued_state)"
    echo "queued resource $NAME: $state"
    case "$state" in
      ACTIVE) break ;;
      FAILED|SUSPENDED)
        echo "queued resource $NAME is $state: deleting it (created here) so that it can be asked for again"
        run gcloud compute tpus queued-resources delete "$NAME" --zone "$ZONE" --force --quiet
        exit 1 ;;
    esac
    if overdue; then
      echo "queued resource $NAME is not ACTIVE after ${TIMEOUT}s: deleting it (created here)" >&2
      run gcloud compute tpus queued-resources delete "$NAME" --zone "$ZONE" --force --quiet
      exit 1
    fi
    sleep "$POLL"
  done
else
  flags=()
  [[ "$PRICING" == "spot" ]] && flags=(--spot)
  [[ "$PRICING" == "preemptible" ]] && flags=(--preemptible)
  run gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION" \
    "${flags[@]+"${flags[@]}"}"
  while true; do
    state="$(vm_state)"
    case "$state" in
      READY) break ;;
      PREEMPTED|TERMINATED|FAILED|STOPPED)
        echo "TPU VM $NAME became $state before it was ready: deleting it (created here)" >&2
        run gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --quiet
        exit 1 ;;
      NOT_FOUND) echo "TPU VM $NAME disappeared before it was ready" >&2; exit 1 ;;
    esac
    if overdue; then
      echo "TPU VM $NAME is not READY after ${TIMEOUT}s ($state): deleting it (created here)" >&2
      run gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --quiet
      exit 1
    fi
    echo "TPU VM $NAME: $state, not ready yet"
    sleep "$POLL"
  done
fi
echo "TPU $NAME ($TYPE, $VERSION, $PRICING) is ready in $ZONE"
