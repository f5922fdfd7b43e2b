#!/usr/bin/env bash
# Launch jaxlm on a Cloud TPU VM or a multi-host TPU pod slice with gcloud.
#
# Usage: launch/tpu_vm.sh SUBCOMMAND [OPTIONS] [--config.KEY=VALUE ...] [-- EXTRA_TRAIN_ARGS ...]
#
# Subcommands, in the order of a session:
#   create   create the TPU VM or pod slice
#              --name --zone --accelerator-type --version [--project] [--spot]
#   queued   the same through a queued resource, which waits for capacity instead of failing
#              --name --zone --accelerator-type --version [--project] [--spot]
#   install  put jaxlm (with jax[tpu]) into ~/jaxlm-venv on every worker
#              --name --zone [--project] [--repo GIT_URL|DIR] [--ref REF] [--python VERSION]
#   run      run `jaxlm train` on every worker; each worker appends its output to ~/jaxlm-logs/train.log
#              --name --zone --config --workdir [--project] [--detach] [--config.KEY=VALUE ...] [-- ARGS ...]
#   logs     copy every worker's ~/jaxlm-logs/train.log to LOGDIR/worker-I.log here
#              --name --zone [--project] [--num-workers N] [--logdir DIR]
#   delete   delete the TPU VM (with --queued: the queued resource and its TPU VM)
#              --name --zone [--project] [--queued]
#
# Every subcommand takes --dry-run: it prints the exact commands (shell-quoted, one per line,
# prefixed by "+ ") and runs nothing, so it works without gcloud and without a project.
#
# Example (a 4-host v5e pod slice):
#   launch/tpu_vm.sh create  --name lm --zone us-west4-a --accelerator-type v5litepod-16 \
#       --version v2-alpha-tpuv5-lite --spot
#   launch/tpu_vm.sh install --name lm --zone us-west4-a
#   launch/tpu_vm.sh run     --name lm --zone us-west4-a --config configs/gpt.py:size=small \
#       --workdir gs://my-bucket/runs/gpt-small --config.train.num_steps=1000
#   launch/tpu_vm.sh logs    --name lm --zone us-west4-a
#   launch/tpu_vm.sh delete  --name lm --zone us-west4-a
#
# Errors a user can cause print one line naming the option and the fix, and exit with status 2.
set -euo pipefail

readonly PROG="launch/tpu_vm.sh"
# Associative arrays and empty "${array[@]}" under `set -u` need bash 4.4; macOS ships 3.2.
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "$PROG: needs bash 4.4 or newer, found $BASH_VERSION: install a newer bash (macOS: brew install bash)" >&2
  exit 2
fi
readonly SUBCOMMANDS="create queued install run logs delete"
# Which options each subcommand accepts; anything else is an error rather than silently ignored,
# so that a misplaced --spot or --config cannot go unnoticed.
declare -rA ALLOWED=(
  [create]="--name --zone --project --accelerator-type --version --spot"
  [queued]="--name --zone --project --accelerator-type --version --spot"
  [install]="--name --zone --project --repo --ref --python"
  [run]="--name --zone --project --config --workdir --detach"
  [logs]="--name --zone --project --num-workers --logdir"
  [delete]="--name --zone --project --queued"
)

# Fixed places on every worker. They are written literally (never shell-quoted) into remote
# commands so that the worker's shell expands the "~".
# shellcheck disable=SC2088
readonly REMOTE_SRC="~/jaxlm"
# shellcheck disable=SC2088
readonly REMOTE_VENV="~/jaxlm-venv"
# shellcheck disable=SC2088
readonly REMOTE_LOG_DIR="~/jaxlm-logs"
# scp paths without a leading "/" are relative to the remote home directory.
readonly REMOTE_LOG_SCP="jaxlm-logs/train.log"
readonly REMOTE_TARBALL="jaxlm-src.tar.gz"

SUBCOMMAND=""
NAME=""
ZONE=""
PROJECT=""
ACCELERATOR_TYPE=""
VERSION=""
REPO=""
REF=""
PYTHON_VERSION="3.11"
CONFIG=""
WORKDIR=""
NUM_WORKERS=""
LOGDIR=""
DRY_RUN=0
SPOT=0
DETACH=0
QUEUED=0
OVERRIDES=()
EXTRA_ARGS=()
SEEN=()
PROJECT_ARGS=()

usage() {
  # The header comment of this file is the manual: print it without the leading "# ".
  local line
  while IFS= read -r line; do
    [[ $line == "#!"* ]] && continue
    [[ $line == "#"* ]] || break
    line=${line#"#"}
    printf '%s\n' "${line# }"
  done <"${BASH_SOURCE[0]}"
}

die() {
  # One line on stderr and exit status 2: the contract for errors a user can cause.
  printf '%s: %s\n' "$PROG" "$*" >&2
  exit 2
}

note() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

shell_quote() {
  # Quote one word the way Python's shlex.quote does, so the printed commands can be pasted
  # into a shell and parsed back exactly: safe words stay bare, others are single-quoted.
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

quote_words() {
  # All arguments, each quoted, separated by single spaces.
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

run_cmd() {
  # The one place every command goes through. Under --dry-run print it to stdout and run
  # nothing; otherwise echo it to stderr (a record of what ran, like `set -x`) and run it.
  if ((DRY_RUN)); then
    printf '+ %s\n' "$(quote_words "$@")"
  else
    printf '+ %s\n' "$(quote_words "$@")" >&2
    "$@"
  fi
}

set_option() {
  local opt=$1 value=$2
  case $opt in
    --name) NAME=$value ;;
    --zone) ZONE=$value ;;
    --project) PROJECT=$value ;;
    --accelerator-type) ACCELERATOR_TYPE=$value ;;
    --version) VERSION=$value ;;
    --repo) REPO=$value ;;
    --ref) REF=$value ;;
    --python) PYTHON_VERSION=$value ;;
    --config) CONFIG=$value ;;
    --workdir) WORKDIR=$value ;;
    --num-workers) NUM_WORKERS=$value ;;
    --logdir) LOGDIR=$value ;;
    --dry-run | --spot | --detach | --queued) die "$opt takes no value: write $opt alone" ;;
    *) die "unknown option $opt: see '$PROG --help' for the options of each subcommand" ;;
  esac
  SEEN+=("$opt")
}

parse_args() {
  [[ $# -gt 0 ]] || die "missing subcommand: run '$PROG SUBCOMMAND ...' with one of: $SUBCOMMANDS"
  case $1 in
    -h | --help | help)
      usage
      exit 0
      ;;
    create | queued | install | run | logs | delete) SUBCOMMAND=$1 ;;
    *) die "unknown subcommand '$1': use one of: $SUBCOMMANDS" ;;
  esac
  shift
  while [[ $# -gt 0 ]]; do
    local arg=$1
    case $arg in
      --)
        # Everything after "--" goes to `jaxlm train` verbatim.
        shift
        EXTRA_ARGS+=("$@")
        SEEN+=("--")
        break
        ;;
      --config.*)
        # Overrides of the config (ml_collections flags) pass through to `jaxlm train`.
        [[ $arg == *=* ]] || die "override $arg has no value: write it as $arg=VALUE"
        OVERRIDES+=("$arg")
        SEEN+=("--config.KEY=VALUE")
        ;;
      -h | --help)
        usage
        exit 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      --spot) SPOT=1 && SEEN+=("$arg") ;;
      --detach) DETACH=1 && SEEN+=("$arg") ;;
      --queued) QUEUED=1 && SEEN+=("$arg") ;;
      --*=*) set_option "${arg%%=*}" "${arg#*=}" ;;
      --*)
        [[ $# -ge 2 ]] || die "option $arg needs a value: write $arg VALUE"
        set_option "$arg" "$2"
        shift
        ;;
      *) die "unexpected argument '$arg': options start with -- (see '$PROG --help')" ;;
    esac
    shift
  done
}

check_args() {
  # Options that do not belong to the subcommand are mistakes: say so instead of ignoring them.
  local opt allowed=" ${ALLOWED[$SUBCOMMAND]} "
  [[ $SUBCOMMAND == run ]] && allowed+="--config.KEY=VALUE -- "
  for opt in "${SEEN[@]}"; do
    [[ $allowed == *" $opt "* ]] || die "$opt does not apply to '$SUBCOMMAND': remove it (see '$PROG --help')"
  done

  require "$NAME" --name "NAME (the TPU VM name, e.g. --name jaxlm-v5e)"
  # The TPU API accepts lowercase letters, digits and hyphens, starting with a letter.
  [[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name '$NAME' is not a valid TPU name: use lowercase letters, digits and hyphens, starting with a letter"
  require "$ZONE" --zone "ZONE (e.g. --zone us-west4-a)"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    die "--zone '$ZONE' is not a zone: write a zone such as us-west4-a (a region plus a letter)"
  if [[ -n $PROJECT ]]; then
    # Without --project, gcloud uses its configured default project.
    PROJECT_ARGS=(--project="$PROJECT")
  fi

  local extra
  for extra in "${EXTRA_ARGS[@]}"; do
    # After "--" it would reach `jaxlm train`, and the commands would run for real.
    [[ $extra != --dry-run ]] || die "--dry-run after -- would go to jaxlm train: put --dry-run before --"
  done

  case $SUBCOMMAND in
    create | queued)
      require "$ACCELERATOR_TYPE" --accelerator-type "TYPE (e.g. --accelerator-type v5litepod-16)"
      require "$VERSION" --version "RUNTIME (e.g. --version v2-alpha-tpuv5-lite)"
      # Catches swapped values: types look like v4-8, v5litepod-16, v6e-64.
      [[ $ACCELERATOR_TYPE =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
        die "--accelerator-type '$ACCELERATOR_TYPE' is not a TPU type: write e.g. --accelerator-type v5litepod-16"
      ;;
    install)
      [[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "--python '$PYTHON_VERSION' is not a Python version: write e.g. --python 3.11"
      if [[ -z $REPO ]]; then
        REPO=$(default_repo)
      elif [[ -d $REPO ]]; then
        :
      elif [[ $REPO == *://* || $REPO == git@*:* || $REPO == *.git ]]; then
        :
      else
        die "--repo '$REPO' is neither a local directory nor a git URL: pass a checkout of jaxlm or a URL like https://github.com/ORG/jaxlm.git"
      fi
      [[ -z $REF || ! -d $REPO ]] || die "--ref applies to a git URL only: drop --ref, or pass --repo GIT_URL"
      ;;
    run)
      require "$CONFIG" --config "FILE[:ARG] (e.g. --config configs/gpt.py:size=small)"
      require "$WORKDIR" --workdir "DIR (e.g. --workdir gs://my-bucket/runs/gpt-small)"
      if [[ $WORKDIR != gs://* ]]; then
        # Not an error (a one-host VM can keep checkpoints on its disk), but on a pod slice every
        # worker would write its own partial checkpoint to its own disk.
        note "note: --workdir $WORKDIR is on each worker's local disk; use a gs:// path on multi-host slices"
      fi
      ;;
    logs)
      [[ -z $NUM_WORKERS || $NUM_WORKERS =~ ^[1-9][0-9]*$ ]] ||
        die "--num-workers '$NUM_WORKERS' is not a positive integer: write e.g. --num-workers 4"
      LOGDIR=${LOGDIR:-logs/$NAME}
      ;;
  esac
}

require() {
  # require VALUE OPTION HINT: a missing required option is one line naming it and an example.
  [[ -n $1 ]] || die "missing $2 for '$SUBCOMMAND': pass $2 $3"
}

default_repo() {
  # The jaxlm checkout that holds this script (launch/..), found without external commands.
  local dir
  case ${BASH_SOURCE[0]} in
    */*) dir=${BASH_SOURCE[0]%/*} ;;
    *) dir=. ;;
  esac
  (cd "$dir/.." && pwd)
}

gcloud_tpu() {
  # gcloud compute tpus ... with the zone and (if given) project every call needs.
  run_cmd gcloud compute tpus "$@" --zone="$ZONE" "${PROJECT_ARGS[@]}"
}

on_all_workers() {
  # Run one shell command on every worker at once; gcloud streams their output here.
  gcloud_tpu tpu-vm ssh "$NAME" --worker=all --command="$1"
}

cmd_create() {
  local -a flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION")
  if ((SPOT)); then
    flags+=(--spot)
  fi
  gcloud_tpu tpu-vm create "$NAME" "${flags[@]}"
}

cmd_queued() {
  # The queued resource and its TPU VM share the name, so every other subcommand works on it
  # once it is ACTIVE.
  local -a flags=(--node-id="$NAME" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$VERSION")
  if ((SPOT)); then
    flags+=(--spot)
  fi
  gcloud_tpu queued-resources create "$NAME" "${flags[@]}"
  note "queued: the TPU VM exists once 'gcloud compute tpus queued-resources describe $NAME --zone=$ZONE' says ACTIVE"
}

cmd_install() {
  local fetch
  if [[ -d $REPO ]]; then
    # A local checkout (possibly with uncommitted edits) is packed without its virtual
    # environment, git history and run outputs, copied to every worker and unpacked there.
    local tarball="${TMPDIR:-/tmp}/jaxlm-src-$NAME.tar.gz"
    run_cmd tar -czf "$tarball" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=./logs \
      --exclude=__pycache__ --exclude='*.egg-info' -C "$REPO" .
    gcloud_tpu tpu-vm scp "$tarball" "$NAME:$REMOTE_TARBALL" --worker=all
    fetch="rm -rf $REMOTE_SRC && mkdir -p $REMOTE_SRC && tar -xzf ~/$REMOTE_TARBALL -C $REMOTE_SRC"
  else
    fetch="rm -rf $REMOTE_SRC && git clone --quiet $(shell_quote "$REPO") $REMOTE_SRC"
    if [[ -n $REF ]]; then
      fetch+=" && git -C $REMOTE_SRC checkout --quiet $(shell_quote "$REF")"
    fi
  fi
  # TPU VM images ship an older system Python than jaxlm needs, so uv provides a managed
  # Python of the requested version in a virtual environment. The editable install keeps
  # configs/ next to the package, which `run` uses as its working directory.
  local remote="set -euo pipefail; $fetch"
  # pip --user is refused on images whose system Python is externally managed; uv's own
  # installer puts it in the same place then.
  remote+="; python3 -m pip install --user --quiet --upgrade uv || curl -LsSf https://astral.sh/uv/install.sh | sh"
  remote+="; [ -x $REMOTE_VENV/bin/python ] || ~/.local/bin/uv venv --python $(shell_quote "$PYTHON_VERSION") $REMOTE_VENV"
  remote+="; ~/.local/bin/uv pip install --python $REMOTE_VENV/bin/python -e $REMOTE_SRC 'jax[tpu]'"
  remote+="; $REMOTE_VENV/bin/python -c 'import jax, jaxlm' && echo \"jaxlm installed on \$(hostname)\""
  on_all_workers "$remote"
}

cmd_run() {
  # `jaxlm train` finds the other hosts of a TPU pod slice by itself, so every worker runs the
  # same command. It runs from the source tree so that relative config paths resolve.
  local train
  train="cd $REMOTE_SRC && $REMOTE_VENV/bin/jaxlm train --config $(shell_quote "$CONFIG") --workdir $(shell_quote "$WORKDIR")"
  if ((${#OVERRIDES[@]} + ${#EXTRA_ARGS[@]})); then
    train+=" $(quote_words "${OVERRIDES[@]}" "${EXTRA_ARGS[@]}")"
  fi
  # A header line separates the runs appended to the same log and names the worker.
  local header="echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$(hostname): jaxlm train ===\""
  local remote
  if ((DETACH)); then
    # nohup and closed stdio let the ssh sessions end while training goes on; read progress
    # with the logs subcommand.
    local job="{ $header; $train; } >> $REMOTE_LOG_DIR/train.log 2>&1"
    remote="mkdir -p $REMOTE_LOG_DIR && nohup bash -c $(shell_quote "$job") > /dev/null 2>&1 < /dev/null &"
  else
    # pipefail makes the ssh exit status that of jaxlm, not of tee.
    remote="set -o pipefail; mkdir -p $REMOTE_LOG_DIR && { $header; $train; } 2>&1 | tee -a $REMOTE_LOG_DIR/train.log"
  fi
  on_all_workers "$remote"
}

cmd_logs() {
  # gcloud refuses --worker=all when copying from the workers to here ("cannot target multiple
  # workers while copying files to client"), so copy each worker's log on its own.
  local count=$NUM_WORKERS
  if [[ -z $count ]]; then
    if ((DRY_RUN)); then
      gcloud_tpu tpu-vm describe "$NAME" --format='value(networkEndpoints.len())'
      note "dry run: the worker count comes from the describe command above; showing worker 0 (pass --num-workers N to show all)"
      count=1
    else
      count=$(gcloud_tpu tpu-vm describe "$NAME" --format='value(networkEndpoints.len())')
      [[ $count =~ ^[1-9][0-9]*$ ]] || die "could not read the worker count of $NAME: pass --num-workers N"
    fi
  fi
  run_cmd mkdir -p "$LOGDIR"
  local i
  for ((i = 0; i < count; i++)); do
    gcloud_tpu tpu-vm scp "$NAME:$REMOTE_LOG_SCP" "$LOGDIR/worker-$i.log" --worker="$i"
  done
}

cmd_delete() {
  # --quiet skips the confirmation prompt, so the script can run unattended.
  if ((QUEUED)); then
    # --force also deletes the TPU VM the queued resource created.
    gcloud_tpu queued-resources delete "$NAME" --force --quiet
  else
    gcloud_tpu tpu-vm delete "$NAME" --quiet
  fi
}

main() {
  parse_args "$@"
  check_args
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH: install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install), or add --dry-run to print the commands"
  fi
  "cmd_$SUBCOMMAND"
}

main "$@"
