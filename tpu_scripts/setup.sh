#!/usr/bin/env bash
# setup.sh NAME --zone ZONE [--dry-run]
#
# Ships the current commit (never a dirty tree: commit first) to every worker and installs jaxtune
# with jax[tpu] and gcsfs (gs:// workdirs) into ~/venv, identically on all hosts.
source "$(dirname "$0")/common.sh"
if wants_help "$@"; then usage; exit 0; fi

parse_common "$@"
[[ ${#ARGS[@]} -eq 0 ]] || die "unknown option '${ARGS[0]}' (see --help)"
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
[[ -z "$(git status --porcelain --untracked-files=no)" ]] || die "the working tree has uncommitted changes; commit them so every worker runs the same code"
commit="$(git rev-parse --short HEAD)"
archive="${TMPDIR:-/tmp}/jaxtune-$commit.tar.gz"
run git archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$NAME:jaxtune.tar.gz" --zone "$ZONE" --worker=all
on_all_workers "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR ~/$LOG_DIR && tar xzf ~/jaxtune.tar.gz -C ~/$REMOTE_DIR && python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip && ~/venv/bin/pip install -q -e ~/$REMOTE_DIR'[tpu]' && echo $commit > ~/$REMOTE_DIR/COMMIT"
echo "jaxtune $commit installed on every worker of $NAME"
