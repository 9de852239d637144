#!/usr/bin/env bash
# stop.sh NAME --zone ZONE [--dry-run]
#
# Sends SIGTERM to jaxtune on every worker: the run saves a checkpoint at the next log step and exits
# 75; launching the same command again resumes it.
source "$(dirname "$0")/common.sh"
if wants_help "$@"; then sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi

parse_common "$@"
[[ ${#ARGS[@]} -eq 0 ]] || die "unknown option '${ARGS[0]}' (see --help)"
on_all_workers "pkill -TERM -f 'jaxtune(.cli)? train' || true"
