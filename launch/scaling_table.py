"""The scaling table of launch/scaling_test.sh: one row per run directory, Markdown and CSV.

    python launch/scaling_table.py RUN_DIR... [--md scaling.md] [--csv scaling.csv]

Each RUN_DIR holds the run's ``summary.json`` (from stratopt_ds.train) and ``launch.json``
(``{"nodes": N}``, written by the scaling script; 1 when missing). Rows keep the order given;
the speed-up is against the first row. The norm all-reduce share is rank 0's time in the
per-layer norm all-reduce over its training time (summary.json's ``norm_allreduce_share``).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

COLUMNS = ["ranks", "nodes", "tokens_per_s", "step_time_s", "norm_allreduce_share", "speedup",
           "last_loss"]


def rows(run_dirs: list[Path]) -> list[dict]:
    out = []
    for run in run_dirs:
        summary_path = run / "summary.json"
        if not summary_path.is_file():
            raise SystemExit(f"scaling_table: {summary_path} is missing (did the run fail?)")
        s = json.loads(summary_path.read_text())
        launch = json.loads((run / "launch.json").read_text()) if (run / "launch.json").is_file() else {}
        out.append({"ranks": s["ranks"], "nodes": launch.get("nodes", 1),
                    "tokens_per_s": s["tokens_per_s"],
                    # older summaries lack the timing keys: derive what can be derived
                    "step_time_s": s.get("step_time", s["train_time"] / max(1, len(s["losses"]))),
                    "norm_allreduce_share": s.get("norm_allreduce_share"),
                    "last_loss": s["last_loss"]})
    for r in out:
        r["speedup"] = r["tokens_per_s"] / out[0]["tokens_per_s"]
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| ranks | nodes | tokens/s | step time (ms) | norm all-reduce share of step "
             "| speed-up | last loss |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        share = "n/a" if r["norm_allreduce_share"] is None else f"{100 * r['norm_allreduce_share']:.1f}%"
        loss = "n/a" if r["last_loss"] is None else f"{r['last_loss']:.4f}"
        lines.append(f"| {r['ranks']} | {r['nodes']} | {r['tokens_per_s']:,.0f} "
                     f"| {1000 * r['step_time_s']:.1f} | {share} | {r['speedup']:.2f}x | {loss} |")
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories, in table order")
    p.add_argument("--md", type=Path, help="write the Markdown table here")
    p.add_argument("--csv", type=Path, help="write the CSV table here")
    args = p.parse_args(argv)
    table = rows(args.runs)
    text = markdown(table)
    if args.md:
        args.md.write_text(text)
    if args.csv:
        write_csv(table, args.csv)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
