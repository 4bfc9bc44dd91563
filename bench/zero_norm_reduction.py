"""Cost of exact per-layer norms under ZeRO: the norm phase as a share of an AdamW step.

    python bench/zero_norm_reduction.py                # launches 2 and 4 CPU ranks, prints a table

For each ZeRO stage it trains the tiny LLaMA preset with torch AdamW and with StratOpt, in the
same launch, and times (median over steps) the whole engine step (forward, backward, step) and
StratOpt's norm phase: local fragment sums of squares, the waiting groups' sums, and the one
all-reduce. The figure of merit is norm phase / AdamW step.

Under tensor or pipeline parallelism the norm vector is still reduced once, over every rank
(pipeline x tensor x data), not once over the data-parallel group and again over the
model-parallel group: every element of every layer lives on exactly one rank (a replicated
tensor counts on TP rank 0 only), so one SUM is exact. At 4 ranks the second table times both
ways on length-L float64 vectors (L: the layer count at block, tensor and a large granularity):
one all-reduce over 4 ranks against two over 2-rank groups in sequence.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Stopwatch:
    """Accumulates the time spent inside wrapped functions."""

    def __init__(self):
        self.total = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start
        return timed


def worker(out: str, steps: int, warmup: int) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from stratopt_ds import create_optimizer, models
    from stratopt_ds.deepspeed import release_cpu_comm_shm
    from stratopt_ds.zero import binding

    deepspeed.init_distributed(dist_backend="gloo")
    release_cpu_comm_shm()
    rank, world = dist.get_rank(), dist.get_world_size()
    watch = Stopwatch()
    # the norm phase: local fragment sums, the waiting groups' sums and the one all-reduce
    binding.ZeroBinding.layer_sq = watch.wrap(binding.ZeroBinding.layer_sq)

    rows = []
    for stage in (1, 2, 3):
        for name in ("adamw-torch", "stratopt"):
            torch.manual_seed(0)
            model = models.build_model("tiny", vocab_size=257, seq_len=64, seed=0)
            opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if name == "adamw-torch"
                   else create_optimizer("stratopt", model, lr=1e-3))
            config = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
                      "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                      "steps_per_print": 10**9}
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
            gen = torch.Generator().manual_seed(rank)
            step_times, norm_times = [], []
            for step in range(warmup + steps):
                x = torch.randint(0, 257, (4, 65), generator=gen)
                dist.barrier()
                watch.total = 0.0
                start = time.perf_counter()
                loss = engine(input_ids=x[:, :-1], labels=x[:, 1:]).loss
                engine.backward(loss)
                engine.step()
                if step >= warmup:
                    step_times.append(time.perf_counter() - start)
                    norm_times.append(watch.total)
            rows.append({"stage": stage, "optimizer": name, "world": world,
                         "step_ms": 1e3 * statistics.median(step_times),
                         "norm_ms": 1e3 * statistics.median(norm_times)})
    if world == 4:
        rows += one_or_two_collectives(rank)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()


def one_or_two_collectives(rank: int, reps: int = 300) -> list[dict]:
    """Median seconds of one all-reduce over 4 ranks vs. two over 2-rank groups (data, then
    model parallel: the groups of a 2 x 2 layout), for norm vectors of length L."""
    import torch
    import torch.distributed as dist

    data = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    model = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    mine_data, mine_model = data[rank // 2], model[rank % 2]
    rows = []
    for length in (34, 291, 16384):  # 7b: 32 blocks + 2 (block), 291 tensors; a large L
        vec = torch.ones(length, dtype=torch.float64)
        for how in ("one", "two"):
            times = []
            for _ in range(reps):
                dist.barrier()
                start = time.perf_counter()
                if how == "one":
                    dist.all_reduce(vec)
                else:
                    dist.all_reduce(vec, group=mine_data)
                    dist.all_reduce(vec, group=mine_model)
                times.append(time.perf_counter() - start)
            rows.append({"collectives": how, "length": length, "us": 1e6 * statistics.median(times)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        return worker(args.worker_out, args.steps, args.warmup)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, world in enumerate(int(w) for w in args.worlds.split(",")):
            out = os.path.join(tmp, f"{world}.json")
            cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world),
                   "--master_port", str(29850 + i), __file__, "--worker-out", out,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            rows += json.loads(Path(out).read_text())
    collectives = [r for r in rows if "collectives" in r]
    rows = [r for r in rows if "collectives" not in r]
    print(f"{'ranks':>5} {'stage':>5} {'AdamW step ms':>14} {'StratOpt step ms':>17} "
          f"{'norm phase ms':>14} {'norm / AdamW step':>18}")
    for world in sorted({r["world"] for r in rows}):
        for stage in (1, 2, 3):
            adamw = next(r for r in rows if (r["world"], r["stage"], r["optimizer"]) == (world, stage, "adamw-torch"))
            ours = next(r for r in rows if (r["world"], r["stage"], r["optimizer"]) == (world, stage, "stratopt"))
            print(f"{world:>5} {stage:>5} {adamw['step_ms']:>14.2f} {ours['step_ms']:>17.2f} "
                  f"{ours['norm_ms']:>14.3f} {ours['norm_ms'] / adamw['step_ms']:>18.3f}")
    if collectives:
        print(f"\n4 ranks as 2 x 2: the norm vector's reduction, median us\n"
              f"{'L':>6} {'one over 4 ranks':>17} {'two over 2+2':>13} {'two / one':>10}")
        for length in sorted({r["length"] for r in collectives}):
            one, two = (next(r["us"] for r in collectives if (r["length"], r["collectives"]) == (length, how))
                        for how in ("one", "two"))
            print(f"{length:>6} {one:>17.1f} {two:>13.1f} {two / one:>10.2f}")


if __name__ == "__main__":
    main()
