#!/usr/bin/env bash
# launch.sh NAME --zone ZONE --run RUN [--dry-run] -- COMMAND...
#
# Starts the same COMMAND (e.g. `jaxtune train configs/x.py --config.workdir=gs://b/run`) on every
# worker at once, in a tmux session named RUN, after freeing a TPU that a stale process still holds.
# Output goes to ~/logs/RUN.log on each worker and the exit code to ~/logs/RUN.exit (75 = resume me).
source "$(dirname "$0")/common.sh"
if wants_help "$@"; then sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi

split_command "$@"
parse_common "${BEFORE[@]+"${BEFORE[@]}"}"
RUN=""
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run) [[ $# -ge 2 ]] || die "--run needs a value"; RUN="$2"; shift 2 ;;
    --run=*) RUN="${1#*=}"; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$RUN" ]] || die "--run NAME is required (it names the tmux session and the log files)"
[[ "$RUN" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run '$RUN': use letters, digits, '.', '_' or '-'"
[[ ${#COMMAND[@]} -gt 0 ]] || die "the command to run goes after '--', e.g. -- jaxtune train configs/x.py"

job="cd ~/$REMOTE_DIR && PATH=~/venv/bin:\$PATH $(quoted "${COMMAND[@]}") > ~/$LOG_DIR/$RUN.log 2>&1; echo \$? > ~/$LOG_DIR/$RUN.exit"
free_tpu="tmux kill-session -t $RUN 2>/dev/null; sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | xargs -r sudo kill -9; true"
on_all_workers "$free_tpu; mkdir -p ~/$LOG_DIR && rm -f ~/$LOG_DIR/$RUN.exit && tmux new-session -d -s $RUN $(printf '%q' "$job")"
echo "started '$RUN' on every worker of $NAME; follow it with: $(dirname "$0")/logs.sh $NAME --zone $ZONE --run $RUN"
