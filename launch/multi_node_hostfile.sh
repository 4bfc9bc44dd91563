#!/usr/bin/env bash
# Train on the nodes of a hostfile, started from one machine: deepspeed reaches every node over
# pdsh (ssh) or MPI and starts its ranks there.
#
# Usage: launch/multi_node_hostfile.sh HOSTFILE [train args...]
#   launch/multi_node_hostfile.sh launch/hostfile.example --device cuda \
#       --preset 1b --deepspeed_config ds_configs/1b_zero2.json --out /shared/runs/1b
#   LAUNCHER=openmpi launch/multi_node_hostfile.sh my_hosts --device cuda ...
#
# HOSTFILE: one "hostname slots=GPUS" line per node, see launch/hostfile.example ($HOSTFILE when
# no argument names one). The first host is node 0 and global rank 0.
#
# Environment:
#   LAUNCHER       pdsh (default; needs pdsh here and passwordless ssh to every host), openmpi,
#                  mpich, impi or mvapich: mpirun starts the ranks, DeepSpeed then finds them
#                  with mpi4py (install it) and meets at rank 0's `hostname -I`, port 29500,
#                  ignoring MASTER_ADDR / MASTER_PORT
#   NUM_NODES      pdsh only: use the first N hosts of the file (default: all)
#   GPUS_PER_NODE  pdsh only: use slots 0..G-1 of each host (default: the file's slots)
#   MASTER_ADDR    address of the first host as the others see it (default: deepspeed asks the
#                  first host for `hostname -I` over ssh)
#   MASTER_PORT    default 29500; SSH_PORT: ssh port, if not 22
#   also DS_CONFIG, DEEPSPEED, DS_LAUNCHER_ARGS, OMP_NUM_THREADS (launch/_common.sh)
# Every node must have this repository and its environment at the same path and the current
# directory must exist on all of them (pdsh runs `cd $PWD` there); --out must be on a shared file
# system. Only PYTHON*, NCCL*, UCX*, MV2* and MLFLOW* variables reach the nodes; put others (e.g.
# OMP_NUM_THREADS) as KEY=VALUE lines in ./.deepspeed_env or ~/.deepspeed_env.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

case ${1:-} in -h | --help) usage; exit 0 ;; esac
if [[ $# -gt 0 && $1 != -* ]]; then
  HOSTFILE=$1
  shift
fi
[[ -n ${HOSTFILE:-} ]] || die "name a hostfile: $(basename "$0") HOSTFILE [train args...]"
[[ -r $HOSTFILE ]] || die "cannot read hostfile $HOSTFILE"
grep -Eq '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$HOSTFILE" \
  || die "$HOSTFILE has no 'hostname slots=N' line (see launch/hostfile.example)"

LAUNCHER=${LAUNCHER:-pdsh}
LAUNCH_OPTS=(--hostfile "$HOSTFILE" --launcher "$LAUNCHER")
case $LAUNCHER in
  pdsh)
    command -v pdsh > /dev/null || die "LAUNCHER=pdsh but pdsh is not installed here"
    if [[ -n ${NUM_NODES:-} ]]; then
      require_posint NUM_NODES "$NUM_NODES"
      LAUNCH_OPTS+=(--num_nodes "$NUM_NODES")
    fi
    if [[ -n ${GPUS_PER_NODE:-} ]]; then
      require_posint GPUS_PER_NODE "$GPUS_PER_NODE"
      LAUNCH_OPTS+=(--num_gpus "$GPUS_PER_NODE")
    fi
    ;;
  openmpi | mpich | impi | mvapich)
    command -v mpirun > /dev/null || die "LAUNCHER=$LAUNCHER but mpirun is not installed here"
    # deepspeed's MPI runners start one rank per slot of the whole file and refuse to trim it.
    [[ -z ${NUM_NODES:-}${GPUS_PER_NODE:-} ]] \
      || die "LAUNCHER=$LAUNCHER cannot use NUM_NODES/GPUS_PER_NODE:" \
        "list only the hosts and slots to use in $HOSTFILE"
    ;;
  slurm) die "for slurm use launch/slurm.sbatch" ;;
  *) die "LAUNCHER must be pdsh, openmpi, mpich, impi or mvapich, got '$LAUNCHER'" ;;
esac
MASTER_PORT=${MASTER_PORT:-29500}
require_port MASTER_PORT "$MASTER_PORT"
LAUNCH_OPTS+=(--master_port "$MASTER_PORT")
[[ -z ${MASTER_ADDR:-} ]] || LAUNCH_OPTS+=(--master_addr "$MASTER_ADDR")
[[ -z ${SSH_PORT:-} ]] || LAUNCH_OPTS+=(--ssh_port "$SSH_PORT")
set_train_args "$@"

exec "$DEEPSPEED" "${LAUNCH_OPTS[@]}" "${LAUNCHER_EXTRA[@]}" "${TRAIN_ARGS[@]}"
