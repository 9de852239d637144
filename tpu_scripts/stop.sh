#!/usr/bin/env bash
# stop.sh NAME --zone ZONE [--run RUN] [--dry-run]
#
# Sends SIGTERM to the trainer of RUN (default: every run launch.sh started) on every worker, by the
# pid launch.sh recorded, and to nothing else (not tmux, not the shell around it): all hosts agree on
# one step, checkpoint it and exit 75, which ~/logs/RUN.exit then says; launching the same command
# again resumes it.
source "$(dirname "$0")/common.sh"
if wants_help "$@"; then usage; exit 0; fi

parse_common "$@"
RUN=""
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run) need_value "$@"; RUN="$2"; shift 2 ;;
    --run=*) RUN="${1#*=}"; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -z "$RUN" ]] || check_run_name "$RUN"
# launch.sh's wrapper removes RUN.pid when the trainer exits, so a recorded pid is a live trainer.
on_all_workers "found=0; for f in ~/$LOG_DIR/${RUN:-*}.pid; do [ -f \"\$f\" ] || continue; found=1; \
pid=\$(cat \"\$f\"); kill -TERM \"\$pid\" 2>/dev/null && echo \"[\$(hostname)] SIGTERM to \$(basename \"\$f\" .pid) \
(pid \$pid)\"; done; [ \$found = 1 ] || echo \"[\$(hostname)] no running job${RUN:+ named $RUN}\""
