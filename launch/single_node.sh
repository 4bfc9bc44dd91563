#!/usr/bin/env bash
# Train on one node: `deepspeed --num_gpus N --module stratopt_ds.train ...`.
#
# Usage: launch/single_node.sh [NUM_GPUS] [train args...]
#   launch/single_node.sh 2 --steps 60 --batch-size 16 --out runs/demo          # 2 CPU ranks
#   launch/single_node.sh 8 --preset 134m --data stores/fineweb-gpt2-1.1B --device cuda \
#       --deepspeed_config ds_configs/134m_zero2.json --out runs/134m
#
# NUM_GPUS (ranks): the first argument when it is a number, else $NUM_GPUS, else every GPU that
# nvidia-smi lists, else 2 CPU ranks. Train args go to stratopt_ds.train unchanged (see
# `python -m stratopt_ds.train --help`; --batch-size is the global batch); relative paths in them
# are relative to the current directory.
#
# Environment: MASTER_PORT (default 29500), DS_CONFIG (used when the train args name no
# --deepspeed_config; default ds_configs/tiny_zero2_cpu.json), DEEPSPEED, DS_LAUNCHER_ARGS,
# OMP_NUM_THREADS (default 1); see launch/_common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

case ${1:-} in -h | --help) usage; exit 0 ;; esac
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
  NUM_GPUS=$1
  shift
fi
if [[ -z ${NUM_GPUS:-} ]]; then
  NUM_GPUS=$(gpu_count)
  (( NUM_GPUS > 0 )) || NUM_GPUS=2
fi
require_posint NUM_GPUS "$NUM_GPUS"
MASTER_PORT=${MASTER_PORT:-29500}
require_port MASTER_PORT "$MASTER_PORT"
set_train_args "$@"

# Without a hostfile the launcher stays on this machine and rendezvouses on 127.0.0.1.
exec "$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" "${LAUNCHER_EXTRA[@]}" \
  "${TRAIN_ARGS[@]}"
