# Sourced by the launch/*.sh scripts (never run on its own): the paths, tools and checks they share.
#
# Environment read here (all optional):
#   DEEPSPEED         the deepspeed launcher (default: <repo>/.venv/bin/deepspeed, else PATH)
#   PYTHON            python for small helpers (default: <repo>/.venv/bin/python, else python3)
#   DS_CONFIG         DeepSpeed JSON config, used when the train args name none
#                     (default: <repo>/ds_configs/tiny_zero2_cpu.json)
#   DS_LAUNCHER_ARGS  more deepspeed launcher options, split on spaces, e.g. "--bind_cores_to_rank"
#   OMP_NUM_THREADS   default 1: several CPU ranks per machine must not each start one thread per core

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# Print the comment block at the top of the calling script (its documentation), without the '#'.
usage() {
  sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

require_posint() { # NAME VALUE
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

require_port() { # NAME VALUE
  [[ $2 =~ ^[0-9]+$ ]] && (( $2 >= 1024 && $2 <= 65535 )) \
    || die "$1 must be a TCP port in 1024..65535, got '$2'"
}

abspath() { [[ $1 == /* ]] && echo "$1" || echo "$PWD/$1"; }

# GPUs on this machine, 0 without nvidia-smi (the CPU accelerator then runs the ranks).
gpu_count() {
  local n
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  echo "${n:-0}"
}

if [[ -z ${DEEPSPEED:-} ]]; then
  if [[ -x $REPO/.venv/bin/deepspeed ]]; then
    DEEPSPEED=$REPO/.venv/bin/deepspeed
  else
    DEEPSPEED=$(command -v deepspeed) \
      || die "no deepspeed launcher: run 'make setup' or set DEEPSPEED=/path/to/deepspeed"
  fi
fi
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
DS_CONFIG=$(abspath "${DS_CONFIG:-$REPO/ds_configs/tiny_zero2_cpu.json}")
read -r -a LAUNCHER_EXTRA <<< "${DS_LAUNCHER_ARGS:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# `--module stratopt_ds.train` must import without `pip install -e .`; the pdsh and MPI runners
# forward PYTHON* variables to the other nodes, so this reaches them too.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# TRAIN_ARGS=(--module stratopt_ds.train [--deepspeed_config $DS_CONFIG] "$@"): the config is
# added only when the caller's train args do not name one (train.py needs one under deepspeed).
set_train_args() {
  local a given=0
  for a in "$@"; do
    case $a in
      --deepspeed_config | --deepspeed_config=* | --deepspeed-config | --deepspeed-config=*) given=1 ;;
    esac
  done
  TRAIN_ARGS=(--module stratopt_ds.train)
  if (( ! given )); then
    [[ -f $DS_CONFIG ]] || die "DS_CONFIG: no such file: $DS_CONFIG"
    TRAIN_ARGS+=(--deepspeed_config "$DS_CONFIG")
  fi
  TRAIN_ARGS+=("$@")
}
