#!/usr/bin/env bash
# launch.sh NAME --zone ZONE --run RUN [--dry-run] -- COMMAND...
#
# Starts the same COMMAND (e.g. `jaxtune train configs/x.py --config.workdir=gs://b/run`) on every
# worker at once, in a tmux session named RUN, after freeing a TPU that a stale process still holds.
# Output goes to ~/logs/RUN.log on each worker and the exit code to ~/logs/RUN.exit (75 = resume me).
source "$(dirname "$0")/common.sh"
if wants_help "$@"; then usage; exit 0; fi

split_command "$@"
parse_common "${BEFORE[@]+"${BEFORE[@]}"}"
RUN=""
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run) need_value "$@"; RUN="$2"; shift 2 ;;
    --run=*) RUN="${1#*=}"; shift ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$RUN" ]] || die "--run NAME is required (it names the tmux session and the log files)"
check_run_name "$RUN"
[[ ${#COMMAND[@]} -gt 0 ]] || die "the command to run goes after '--', e.g. -- jaxtune train configs/x.py"

# The wrapper records the trainer's pid for stop.sh and writes its exit code when it ends. A closed
# tmux session (SIGHUP to the wrapper, which leads the session) is passed on to the trainer, which
# checkpoints and exits 75 as on SIGTERM; the wrapper stays to write that code (the trainer's last
# status: bash remembers it after a wait cut short by the trap).
log="\$HOME/$LOG_DIR/$RUN"  # expanded on the worker
job="cd ~/$REMOTE_DIR || exit 1; PATH=~/venv/bin:\$PATH $(quoted "${COMMAND[@]}") > $log.log 2>&1 & \
pid=\$!; trap 'kill -HUP \$pid 2>/dev/null' HUP; echo \$pid > $log.pid; \
while kill -0 \$pid 2>/dev/null; do wait \$pid; done; wait \$pid; code=\$?; rm -f $log.pid; echo \$code > $log.exit"
free_tpu="tmux kill-session -t $RUN 2>/dev/null; sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | xargs -r sudo kill -9; true"
on_all_workers "$free_tpu; mkdir -p ~/$LOG_DIR && rm -f ~/$LOG_DIR/$RUN.exit && tmux new-session -d -s $RUN $(printf '%q' "$job")"
echo "started '$RUN' on every worker of $NAME; follow it with: $(dirname "$0")/logs.sh $NAME --zone $ZONE --run $RUN"
