#!/usr/bin/env bash
# Scaling test: the same job (same global batch, steps and seed) at several rank and node counts,
# then a table of tokens/s, step time and the share of the step spent in the per-layer norm
# all-reduce.
#
# Usage: launch/scaling_test.sh [OUT_DIR] [train args...]
#   launch/scaling_test.sh                                 # 1, 2, 4 ranks on this machine
#   RANKS="1 2 4 8" BATCH=256 DS_CONFIG=ds_configs/134m_zero2.json \
#       launch/scaling_test.sh runs/scaling-134m --preset 134m --device cuda
#   RANKS="" HOSTFILE=hosts NODES="1 2 4" GPUS_PER_NODE=8 launch/scaling_test.sh runs/nodes ...
#
# OUT_DIR (default runs/scaling) gets one directory per run, <N>n_<R>r/ (summary.json,
# metrics.jsonl, launch.log), then scaling.md and scaling.csv with the columns ranks, nodes,
# tokens/s, step time, norm all-reduce share, speed-up over the first row and last loss (equal
# batches and seeds at every size, so the losses should agree closely).
#
# Environment:
#   RANKS          rank counts on this machine, through launch/single_node.sh (default "1 2 4";
#                  empty: none)
#   HOSTFILE, NODES (default "1 2"), GPUS_PER_NODE: also NODES node counts x GPUS_PER_NODE ranks
#                  through launch/multi_node_hostfile.sh with LAUNCHER=pdsh (the default)
#   STEPS (default 30), SEQ_LEN (default 64), BATCH: the global batch of every run (default 16;
#                  it must divide by every rank count x the config's gradient_accumulation_steps)
#   MASTER_PORT    port of the first run (default 29600); run i uses MASTER_PORT + i
#   DS_CONFIG      the config of every run (not --deepspeed_config in the train args), and
#                  DEEPSPEED, PYTHON, DS_LAUNCHER_ARGS, OMP_NUM_THREADS (launch/_common.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

case ${1:-} in -h | --help) usage; exit 0 ;; esac
OUT=runs/scaling
if [[ $# -gt 0 && $1 != -* ]]; then
  OUT=$1
  shift
fi
OUT=$(abspath "$OUT")
for a in "$@"; do
  case $a in --deepspeed_config* | --deepspeed-config*) die "give the config as DS_CONFIG=..., not $a" ;; esac
done
RANKS=${RANKS-1 2 4}
STEPS=${STEPS:-30} SEQ_LEN=${SEQ_LEN:-64} BATCH=${BATCH:-16} PORT=${MASTER_PORT:-29600}
require_posint STEPS "$STEPS"
require_posint SEQ_LEN "$SEQ_LEN"
require_posint BATCH "$BATCH"
require_port MASTER_PORT "$PORT"
[[ -f $DS_CONFIG ]] || die "DS_CONFIG: no such file: $DS_CONFIG"
export DS_CONFIG
GAS=$("$PYTHON" -c 'import json, sys
print(int(json.load(open(sys.argv[1])).get("gradient_accumulation_steps", 1)))' "$DS_CONFIG") \
  || die "cannot read gradient_accumulation_steps from $DS_CONFIG"

# Jobs as "launcher nodes ranks".
JOBS=()
for r in $RANKS; do
  require_posint "RANKS entry" "$r"
  JOBS+=("single 1 $r")
done
if [[ -n ${HOSTFILE:-} ]]; then
  # Each size takes the first NODES hosts of the file (NUM_NODES); deepspeed's MPI runners
  # start every slot of the file and cannot do that.
  [[ ${LAUNCHER:-pdsh} == pdsh ]] || die "a HOSTFILE sweep needs LAUNCHER=pdsh (got '$LAUNCHER'):" \
    "with MPI launchers run launch/multi_node_hostfile.sh once per host file"
  [[ -n ${GPUS_PER_NODE:-} ]] || die "HOSTFILE needs GPUS_PER_NODE (ranks per node)"
  require_posint GPUS_PER_NODE "$GPUS_PER_NODE"
  HOSTFILE=$(abspath "$HOSTFILE")
  for n in ${NODES:-1 2}; do
    require_posint "NODES entry" "$n"
    JOBS+=("hostfile $n $((n * GPUS_PER_NODE))")
  done
fi
(( ${#JOBS[@]} > 0 )) || die "nothing to run: set RANKS, or HOSTFILE with NODES and GPUS_PER_NODE"
# Check every size before the first run: a fixed global batch is the point of the comparison.
for job in "${JOBS[@]}"; do
  read -r _ n r <<< "$job"
  (( BATCH % (r * GAS) == 0 )) || die "BATCH=$BATCH is not divisible by ranks x" \
    "gradient_accumulation_steps = $r x $GAS; pick a global batch that every run can split"
done

mkdir -p "$OUT"
DIRS=()
i=0
for job in "${JOBS[@]}"; do
  read -r how n r <<< "$job"
  dir=$OUT/${n}n_${r}r
  rm -rf "$dir"
  mkdir -p "$dir"
  printf '{"nodes": %d, "ranks": %d}\n' "$n" "$r" > "$dir/launch.json"
  args=(--steps "$STEPS" --batch-size "$BATCH" --seq-len "$SEQ_LEN" --eval-batches 0
        --no-progress --no-tensorboard --out "$dir" "$@")
  echo "scaling_test: $n node(s), $r rank(s) -> $dir"
  start=$SECONDS rc=0
  if [[ $how == single ]]; then
    MASTER_PORT=$((PORT + i)) "$REPO/launch/single_node.sh" "$r" "${args[@]}" \
      > "$dir/launch.log" 2>&1 || rc=$?
  else
    NUM_NODES=$n MASTER_PORT=$((PORT + i)) "$REPO/launch/multi_node_hostfile.sh" "$HOSTFILE" \
      "${args[@]}" > "$dir/launch.log" 2>&1 || rc=$?
  fi
  if [[ $rc != 0 || ! -f $dir/summary.json ]]; then
    tail -n 25 "$dir/launch.log" >&2
    echo "scaling_test: error: the run with $n node(s), $r rank(s) failed (exit $rc);" \
      "log: $dir/launch.log" >&2
    exit 1
  fi
  echo "scaling_test:   done in $((SECONDS - start)) s"
  DIRS+=("$dir")
  i=$((i + 1))
done

"$PYTHON" "$REPO/launch/scaling_table.py" "${DIRS[@]}" --md "$OUT/scaling.md" --csv "$OUT/scaling.csv"
echo "scaling_test: tables in $OUT/scaling.md and $OUT/scaling.csv"
