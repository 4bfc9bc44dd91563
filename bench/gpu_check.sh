#!/usr/bin/env bash
# The one prepared check for a GPU machine that has this repository and no network (CUDA torch,
# nvcc, ninja and pytest installed; nothing else needed). Under 8 minutes on an H100:
#
#   1. JIT-build the CUDA op (and the CPU op the tests compare it with), for this GPU's arch only;
#   2. the CUDA tests: tests/test_cuda_emulation.py's [gpu] cases (every optimizer name,
#      fp32/bf16/fp16 gradients, no/bf16/fp16/mixed copies, m1/v/m2 compared bit for bit with the
#      CPU op, skipped steps, empty and misaligned fragments, a tensor lr, a captured CUDA graph
#      of a bf16 model) and tests/test_ops.py's CUDA cases;
#   3. bench/optimizer_step.py on CUDA at the 134M and 1B layouts: the StratOpt step against
#      torch.optim.AdamW(fused=True), and each kernel's GB/s as a share of the HBM peak.
#
# Everything goes under $OUT (default ./gpu_check_out): env.txt, build.txt, tests.txt, bench.txt,
# summary.txt. Each stage has its own time limit, and a failing stage does not stop the others.
#
#   OUT=/tmp/out bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 STRATOPT_OPS=native
export STRATOPT_OPS_CACHE=${STRATOPT_OPS_CACHE:-/tmp/stratopt_ops_cache}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c \
  "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)}

stage() {  # stage NAME LIMIT_S COMMAND...: run, log to $OUT/NAME.txt, record the status
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

: >"$OUT/summary.txt"
{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))"; nvcc --version; } >"$OUT/env.txt" 2>&1
stage build 180 $PY -m stratopt_ds.ops
stage tests 120 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda_emulation.py tests/test_ops.py \
  -k "gpu or captured_bf16 or test_cuda_update_and_sumsq or test_cuda_graph_replay or test_cuda_sources"
stage bench 150 $PY bench/optimizer_step.py --device cuda --presets 134m 1b --steps 10 --rounds 2 \
  --kernels --graph
tail -n 60 "$OUT/tests.txt" | grep -E "passed|failed|error" | tail -n 3 >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
