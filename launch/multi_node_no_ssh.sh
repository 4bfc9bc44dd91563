#!/usr/bin/env bash
# Train on several nodes without ssh: run this once on every node (by hand, from a scheduler,
# or through launch/slurm.sbatch); each copy starts that node's ranks and all of them meet at
# MASTER_ADDR:MASTER_PORT.
#
# Usage (here node 1 of 2, 8 GPUs each):
#   NODE_RANK=1 NUM_NODES=2 GPUS_PER_NODE=8 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \
#     launch/multi_node_no_ssh.sh --device cuda --deepspeed_config ds_configs/134m_zero2.json ...
#
# Environment:
#   NODE_RANK      this node's index, 0..NUM_NODES-1 (required); node 0 must be MASTER_ADDR
#   NUM_NODES      how many nodes take part (required)
#   GPUS_PER_NODE  ranks per node (default: the GPUs nvidia-smi lists; required on CPU nodes)
#   MASTER_ADDR    address of node 0, reachable from every node (required when NUM_NODES > 1)
#   MASTER_PORT    a free port on node 0 (default 29500)
#   HOSTFILE       optional; see below. Also DS_CONFIG, DEEPSPEED, DS_LAUNCHER_ARGS (_common.sh).
# Train args as for launch/single_node.sh; every node must get the same ones, and --out must be
# on a file system all nodes share (rank 0 writes the logs, every rank its checkpoint shard).
#
# How deepspeed 0.19.8 does it: `deepspeed --no_ssh --node_rank K` still needs a hostfile, only
# to count the nodes and their slots (without one the launcher sees just "localhost", resets
# --master_addr to 127.0.0.1 and rejects any node rank but 0). Under --no_ssh no host named in it
# is contacted, so the names are placeholders: we write "node0 slots=G" ... for NUM_NODES nodes
# unless HOSTFILE is given. --master_addr must be explicit (otherwise the launcher ssh-es to the
# first host to ask `hostname -I`). Node K then gets global ranks K*G .. K*G+G-1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

case ${1:-} in -h | --help) usage; exit 0 ;; esac
[[ -n ${NUM_NODES:-} ]] || die "set NUM_NODES to the number of nodes taking part"
require_posint NUM_NODES "$NUM_NODES"
[[ ${NODE_RANK:-} =~ ^[0-9]+$ ]] && (( NODE_RANK < NUM_NODES )) \
  || die "set NODE_RANK to this node's index in 0..$((NUM_NODES - 1)), got '${NODE_RANK:-}'"
if [[ -z ${GPUS_PER_NODE:-} ]]; then
  GPUS_PER_NODE=$(gpu_count)
  (( GPUS_PER_NODE > 0 )) || die "no GPU found: set GPUS_PER_NODE (ranks per node)"
fi
require_posint GPUS_PER_NODE "$GPUS_PER_NODE"
if [[ -z ${MASTER_ADDR:-} ]]; then
  (( NUM_NODES == 1 )) || die "set MASTER_ADDR to the address of node 0 (NODE_RANK=0)"
  MASTER_ADDR=127.0.0.1
fi
MASTER_PORT=${MASTER_PORT:-29500}
require_port MASTER_PORT "$MASTER_PORT"
set_train_args "$@"

if [[ -n ${HOSTFILE:-} ]]; then
  [[ -r $HOSTFILE ]] || die "HOSTFILE: cannot read $HOSTFILE"
else
  HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/stratopt-hostfile.XXXXXX")
  trap 'rm -f "$HOSTFILE"' EXIT
  for ((i = 0; i < NUM_NODES; i++)); do echo "node$i slots=$GPUS_PER_NODE"; done > "$HOSTFILE"
fi

# The stop signal (train --stop-signal, USR2 by default, e.g. slurm's `--signal=USR2@120`) must
# not kill the launcher before its ranks have saved their checkpoint and exited with code 75:
# ignored here, ignored by the launcher; the ranks catch it themselves.
trap '' USR1 USR2
# --num_nodes / --num_gpus trim a longer HOSTFILE to the first NUM_NODES hosts, GPUS_PER_NODE slots.
"$DEEPSPEED" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --num_nodes "$NUM_NODES" --num_gpus "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${LAUNCHER_EXTRA[@]}" \
  "${TRAIN_ARGS[@]}"
