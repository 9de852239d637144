#!/usr/bin/env bash
# create.sh NAME --type TYPE --zone ZONE [--spot | --preemptible | --on-demand] [--queued] [--poll SECONDS] [--dry-run]
#
# Creates a TPU VM (or, with --queued, a queued resource that waits for capacity) with the runtime
# image its type needs, and waits until it is READY (ACTIVE). A queued resource that ends FAILED or
# SUSPENDED is deleted and the script exits 1, so that a caller (babysit.sh) can ask again.
source "$(dirname "$0")/common.sh"
if wants_help "$@"; then sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi

parse_common "$@"
TYPE="" PRICING="on-demand" QUEUED=0 POLL=30
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) [[ $# -ge 2 ]] || die "--type needs a value"; TYPE="$2"; shift 2 ;;
    --type=*) TYPE="${1#*=}"; shift ;;
    --spot) PRICING="spot"; shift ;;
    --preemptible) PRICING="preemptible"; shift ;;
    --on-demand) PRICING="on-demand"; shift ;;
    --queued) QUEUED=1; shift ;;
    --poll) POLL="$2"; shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$TYPE" ]] || die "--type is required (e.g. --type v4-32)"
VERSION="$(runtime_for "$TYPE")"

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
        run gcloud compute tpus queued-resources delete "$NAME" --zone "$ZONE" --force --quiet
        exit 1 ;;
    esac
    sleep "$POLL"
  done
else
  flags=()
  [[ "$PRICING" == "spot" ]] && flags=(--spot)
  [[ "$PRICING" == "preemptible" ]] && flags=(--preemptible)
  run gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION" \
    "${flags[@]+"${flags[@]}"}"
  until [[ "$(vm_state)" == "READY" ]]; do
    echo "TPU VM $NAME: not ready yet"
    sleep "$POLL"
  done
fi
echo "TPU $NAME ($TYPE, $VERSION, $PRICING) is ready in $ZONE"
