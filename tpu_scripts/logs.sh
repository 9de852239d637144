#!/usr/bin/env bash
# logs.sh NAME --zone ZONE --run RUN [--lines N] [--dry-run]
#
# The last N lines (default 20) of RUN's log on every worker, each line prefixed by its worker, and
# RUN's exit code where it has ended.
source "$(dirname "$0")/common.sh"
if wants_help "$@"; then usage; exit 0; fi

parse_common "$@"
RUN="" LINES=20
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run) need_value "$@"; RUN="$2"; shift 2 ;;
    --run=*) RUN="${1#*=}"; shift ;;
    --lines) need_value "$@"; need_int "$1" "$2"; LINES="$2"; shift 2 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$RUN" ]] || die "--run NAME is required"
check_run_name "$RUN"  # both go into a shell on every worker: plain characters only
on_all_workers "tail -n $LINES ~/$LOG_DIR/$RUN.log | sed \"s/^/[\$(hostname)] /\"; test -f ~/$LOG_DIR/$RUN.exit && echo \"[\$(hostname)] exit \$(cat ~/$LOG_DIR/$RUN.exit)\"; true"
