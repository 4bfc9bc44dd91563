"""End-to-end training throughput, StratOpt vs AdamW: the real training entry under DeepSpeed.

    python bench/end_to_end.py                     # tiny preset, ZeRO-2, 2 CPU ranks, 3 repeats
    python bench/end_to_end.py --ranks 8 --config ds_configs/134m_zero2.json \
        --train-args --preset 134m --device cuda   # on a GPU node

Each run is ``deepspeed --num_gpus R --module stratopt_ds.train --deepspeed_config C ...``
(forward, backward, ZeRO gradient reduction, optimizer step, logging: the whole training loop,
evaluation off; the offline synthetic corpus unless ``--train-args --data ...``) and reports ``tokens_per_s`` from its summary.json. The two optimizers alternate
(S A, A S, S A, ...) so that a drift in machine load hits both alike; the table gives the median
over repeats and the ratio StratOpt / AdamW (goal >= 0.97). On a shared machine other jobs stretch
random steps, so the table also gives a load-robust figure: tokens per step over the 20th
percentile of the per-step times in metrics.jsonl (first two steps excluded), pooled over repeats.

AdamW here is this package's ``adamw`` (``LayerwiseAdamW``: the same engine, ZeRO binding and
per-layer norm all-reduce, with no layer scaling, no slow momentum and no clipping), configured
by replacing the config's optimizer section with ``{"type": "LayerwiseAdamW"}`` and the same lr,
betas, eps and weight decay. torch.optim.AdamW cannot run here: the training entry logs the
per-layer norms that only our optimizers compute. Both runs keep the config's
``gradient_clipping`` (0 in the StratOpt configs: StratOpt clips per layer inside its step;
AdamW then does not clip at all).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")


def deepspeed_bin() -> str:
    local = Path(sys.executable).parent / "deepspeed"
    found = str(local) if local.exists() else shutil.which("deepspeed")
    if not found:
        raise SystemExit("no deepspeed launcher next to this python or on PATH")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adamw_config(config: dict) -> dict:
    """The same DeepSpeed config with our AdamW (same lr, betas, eps, weight decay) as optimizer."""
    params = config.get("optimizer", {}).get("params", {})
    return {**config, "optimizer": {"type": "LayerwiseAdamW",
                                    "params": {k: params[k] for k in ADAMW_KEYS if k in params}}}


def run_once(label: str, config_path: Path, out: Path, args) -> dict:
    cmd = [deepspeed_bin(), "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
           "--module", "stratopt_ds.train", "--deepspeed_config", str(config_path),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--eval-batches", "0", "--no-progress",
           "--no-tensorboard", "--out", str(out), "--data", "synthetic", *args.train_args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0 or not (out / "summary.json").is_file():
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{label} run failed (exit {proc.returncode}): {' '.join(cmd)}")
    summary = json.loads((out / "summary.json").read_text())
    elapsed = [r["elapsed"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if "loss" in r]
    # the durations of steps 3..N: steps 1 and 2 warm up
    summary["step_times"] = [b - a for a, b in zip(elapsed[1:], elapsed[2:])]
    print(f"  {label:8s} {summary['tokens_per_s']:10,.0f} tokens/s  "
          f"step {1000 * summary['step_time']:.1f} ms  "
          f"norm all-reduce {100 * summary['norm_allreduce_share']:.1f}%  "
          f"(wall {time.perf_counter() - start:.0f} s)", flush=True)
    return summary


def spread(runs: list[dict]) -> float:
    """(max - min) / median tokens/s over repeats: how far single runs can be trusted."""
    values = [s["tokens_per_s"] for s in runs]
    return (max(values) - min(values)) / statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "ds_configs" / "tiny_zero2_cpu.json",
                    help="DeepSpeed config whose optimizer is StratOpt (default: tiny_zero2_cpu.json)")
    ap.add_argument("--ranks", type=int, default=2, help="ranks (GPUs, or CPU processes) (default: 2)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per optimizer (default: 3)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run (default: 100)")
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (default: 16)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank (default: 1)")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    ap.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                    help="everything after this goes to stratopt_ds.train, after the bench's own "
                         "options, so it can override them (e.g. --preset 134m --data fineweb); "
                         "the data default is the offline synthetic corpus")
    args = ap.parse_args()
    for name, least in [("ranks", 1), ("repeats", 1), ("steps", 5), ("batch_size", 1),
                        ("seq_len", 1), ("threads", 1)]:
        if getattr(args, name) < least:
            ap.error(f"--{name.replace('_', '-')} must be >= {least}")

    config = json.loads(args.config.read_text())
    if "stratopt" not in str(config.get("optimizer", {}).get("type", "")).lower():
        ap.error(f"--config {args.config}: its optimizer.type should be StratOpt (the AdamW config "
                 f"is derived from it)")
    out = args.out or Path(tempfile.mkdtemp(prefix="stratopt-e2e-"))
    out.mkdir(parents=True, exist_ok=True)
    configs = {"StratOpt": args.config.resolve(), "AdamW": out / "adamw_config.json"}
    configs["AdamW"].write_text(json.dumps(adamw_config(config), indent=2) + "\n")

    print(f"end-to-end: {args.ranks} ranks, {args.steps} steps x {args.batch_size} x {args.seq_len} "
          f"tokens, config {args.config.name}, {args.repeats} repeats, runs in {out}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    results: dict[str, list[dict]] = {"StratOpt": [], "AdamW": []}
    for rep in range(args.repeats):
        order = ["StratOpt", "AdamW"] if rep % 2 == 0 else ["AdamW", "StratOpt"]
        for label in order:
            results[label].append(run_once(label, configs[label], out / f"{label.lower()}_{rep}", args))

    tokens_per_step = args.batch_size * args.seq_len
    med = {}
    for label, runs in results.items():
        med[label] = {key: statistics.median(s[key] for s in runs)
                      for key in ("tokens_per_s", "step_time", "norm_allreduce_share")}
        pooled = sorted(t for s in runs for t in s["step_times"])
        med[label]["p20_tokens_per_s"] = tokens_per_step / pooled[len(pooled) // 5]
    ratio = med["StratOpt"]["tokens_per_s"] / med["AdamW"]["tokens_per_s"]
    ratio_p20 = med["StratOpt"]["p20_tokens_per_s"] / med["AdamW"]["p20_tokens_per_s"]
    print("\n| optimizer | median tokens/s | runs (tokens/s) | median step (ms) "
          "| tokens/s at p20 step | norm all-reduce share |")
    print("|---|---:|---|---:|---:|---:|")
    for label, runs in results.items():
        m = med[label]
        each = ", ".join(f"{s['tokens_per_s']:,.0f}" for s in runs)
        print(f"| {label} | {m['tokens_per_s']:,.0f} | {each} | {1000 * m['step_time']:.1f} "
              f"| {m['p20_tokens_per_s']:,.0f} | {100 * m['norm_allreduce_share']:.1f}% |")
    print(f"\nStratOpt / AdamW, median tokens/s: {ratio:.3f} (goal >= 0.97: "
          f"{'met' if ratio >= 0.97 else 'NOT met'}); at the p20 step time: {ratio_p20:.3f}")
    # other jobs on the machine make single runs differ by far more than the 3% goal
    print(f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"spread of StratOpt runs: {spread(results['StratOpt']):.0%}, "
          f"AdamW: {spread(results['AdamW']):.0%}")
    (out / "results.json").write_text(json.dumps({"runs": results, "median": med, "ratio": ratio,
                                                  "ratio_p20": ratio_p20,
                                                  "args": {k: str(v) for k, v in vars(args).items()}},
                                                 indent=1) + "\n")


if __name__ == "__main__":
    main()
