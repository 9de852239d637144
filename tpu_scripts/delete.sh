#!/usr/bin/env bash
# delete.sh NAME --zone ZONE [--queued] [--dry-run]
#
# Deletes the TPU VM (with --queued: the queued resource and its VM). Checkpoints on gs:// stay.
source "$(dirname "$0")/common.sh"
if wants_help "$@"; then usage; exit 0; fi

parse_common "$@"
QUEUED=0
for arg in "${ARGS[@]+"${ARGS[@]}"}"; do
  case "$arg" in
    --queued) QUEUED=1 ;;
    *) die "unknown option '$arg' (see --help)" ;;
  esac
done
if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$NAME" --zone "$ZONE" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" --quiet
fi
