"""Command line of the study tools.

    python -m stratopt_ds.study check  PLAN [--list]          validate a plan, count its runs
    python -m stratopt_ds.study run    PLAN [--out DIR] [--jobs N] [--retry-failed]
                                       [--executor slurm --partition P --nodes-per-run N ...]
    python -m stratopt_ds.study status DIR                    each run's state, with slurm's
    python -m stratopt_ds.study cancel DIR                    cancel the study's slurm jobs
    python -m stratopt_ds.study report DIR                    report.md / report.json / plots

Exit codes: 0 done; 1 a study error, or runs that diverged or failed (``run`` lists each on
stderr by key with its reason; they are recorded, and ``--retry-failed`` runs them again with
the same seeds); 2 a bad plan; 130/143 interrupted (the runs resume next time).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Optional

from .plan import PlanError, load_plan
from .report import write_report
from .runner import Interrupted, StudyError, failed_runs, run_study

EXIT_FAILED_RUNS = 1  # as a study error: a script that runs a study stops on either


# --flag -> SlurmOptions field (dashes -> underscores), type, help
SLURM_FLAGS = [
    ("--partition", str, "slurm partition"), ("--account", str, "slurm account"),
    ("--qos", str, "quality of service"), ("--time-min", int, "time limit of each job, minutes"),
    ("--nodes-per-run", int, "nodes of each run's job (one DeepSpeed job across them)"),
    ("--gpus-per-node", int, "GPUs per node (0: CPU nodes)"),
    ("--ranks-per-node", int, "ranks per node (default: --gpus-per-node, else 1)"),
    ("--cpus-per-task", int, "CPUs of each node's task"), ("--mem-gb", float, "memory per node, GB"),
    ("--max-running", int, "the study's jobs running at once (the job array's %%limit)"),
    ("--signal-delay-s", int, "time-limit warning, seconds before the end: checkpoint, requeue"),
    ("--max-timeouts", int, "requeues on reaching the time limit before a run fails (default 10)"),
]


def slurm_options(args: argparse.Namespace, plan):
    """The plan's slurm: section, then the command line's options."""
    from .slurm import SlurmOptions

    given = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
             for flag, _, _ in SLURM_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    if args.sbatch:
        given["extra"] = [*plan.slurm.get("extra", []), *args.sbatch]
    defaults = {k: v for k, v in plan.slurm.items() if k != "executor"}
    return SlurmOptions(**{**defaults, **given})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stratopt-study",
                                description="Optimizer studies: plans, runs, statistics, report.")
    sub = p.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a plan and list its runs")
    check.add_argument("plan")
    check.add_argument("--list", action="store_true", help="print every run")
    run = sub.add_parser("run", help="run (or resume) every run of a plan")
    run.add_argument("plan")
    run.add_argument("--out", default=None, help="study directory (default: runs/study_<name>)")
    run.add_argument("--jobs", type=int, default=1,
                     help="single-process runs at once; each gets cores/jobs OpenMP threads")
    run.add_argument("--retry-failed", action="store_true",
                     help="run failed/diverged runs again, with the same seeds")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument("--report", action="store_true", help="write the report when done")
    run.add_argument("--executor", choices=("local", "slurm"), default=None,
                     help="where runs train: here (default), or one slurm job each (submitit); "
                          "the plan's slurm: section gives defaults for the options below")
    slurm_opts = run.add_argument_group("slurm (with --executor slurm)")
    for flag, kind, what in SLURM_FLAGS:
        slurm_opts.add_argument(flag, type=kind, default=None, help=what)
    slurm_opts.add_argument("--sbatch", action="append", default=None, metavar="--KEY=VALUE",
                            help="one more sbatch option per use, e.g. --sbatch=--constraint=a100")
    status = sub.add_parser("status", help="each run's state, merged with slurm's view")
    status.add_argument("directory")
    cancel = sub.add_parser("cancel", help="cancel the study's slurm jobs")
    cancel.add_argument("directory")
    report = sub.add_parser("report", help="statistics, tables and plots of a study directory")
    report.add_argument("directory")
    report.add_argument("--plan", default=None, help="plan file (default: DIR/plan.yaml)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            plan = load_plan(args.plan)
            runs = plan.runs()
            per_size = Counter(r.size for r in runs)
            print(f"{plan.name}: {len(runs)} runs = {len(plan.arms)} arms x {len(plan.sizes)} "
                  f"sizes x {len(plan.seeds)} seeds ({dict(per_size)})")
            for r in runs if args.list else []:
                print(f"  {r.key}")
            return 0
        if args.command == "run":
            plan = load_plan(args.plan)
            out = args.out or f"runs/study_{plan.name}"
            executor = args.executor or ("slurm" if plan.slurm.get("executor") == "slurm" else "local")
            counts = run_study(args.plan, out, args.jobs, args.retry_failed,
                               progress=not args.no_progress,
                               slurm_options=slurm_options(args, plan) if executor == "slurm" else None)
            print("runs: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
            if args.report:
                print(f"report: {write_report(out)[0]}")
            failed = failed_runs(plan, out)
            for key, state in failed:
                print(f"FAILED {key}: {state.status}: {state.reason}", file=sys.stderr)
            if failed:
                print(f"error: {len(failed)} of {len(plan.runs())} runs diverged or failed (listed "
                      f"above; --retry-failed runs them again with the same seeds)", file=sys.stderr)
                return EXIT_FAILED_RUNS
            return 0
        if args.command in ("status", "cancel"):
            from .runner import cancel_study, study_status
            if args.command == "cancel":
                cancelled = cancel_study(args.directory)
                print(f"cancelled {len(cancelled)} job(s){': ' + ' '.join(cancelled) if cancelled else ''}")
                return 0
            for key, state, job in study_status(args.directory):
                print(f"{key:50s} {state:12s} {job or ''}")
            return 0
        md, js = write_report(args.directory, args.plan)
        print(f"report: {md}\n        {js}")
        return 0
    except PlanError as e:
        print(f"plan error: {e}", file=sys.stderr)
        return 2
    except (StudyError, FileNotFoundError) as e:  # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Interrupted:  # SIGTERM
        return 143


if __name__ == "__main__":
    sys.exit(main())
