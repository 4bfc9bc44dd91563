"""What a study directory holds: the state of each run and the numbers the report needs.

Layout written by the runner (``OUT`` is ``--out``)::

    OUT/plan.yaml                      the plan the runs came from (the report reads it)
    OUT/study.json                     runner sessions: start, end, seconds (the study's wall time)
    OUT/runs.jsonl                     one line per finished attempt (history, append-only)
    OUT/<size>/<arm>/seed<s>/          one run: train.py's metrics.jsonl, summary.json and
                                       checkpoints/, plus run_spec.json, train.log, status.json

The state of a run is read from its files alone, so the runner and the report agree on it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..summary import RunSummary
from .plan import Plan, Run, load_plan

PLAN_COPY, STUDY_FILE, EVENTS_FILE = "plan.yaml", "study.json", "runs.jsonl"
SPEC_FILE, STATUS_FILE = "run_spec.json", "status.json"
LOG_FILE, PID_FILE = "train.log", "train.pid"

OK, DIVERGED, FAILED, INTERRUPTED, PENDING = "ok", "diverged", "failed", "interrupted", "pending"
FAILURES = (DIVERGED, FAILED)   # both count against the arm; neither is ever re-seeded


@dataclass
class RunState:
    status: str                 # one of OK, DIVERGED, FAILED, INTERRUPTED, PENDING
    reason: str = ""


def read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # absent, or cut short by a kill: the same as absent


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def run_state(run_dir: Path) -> RunState:
    """summary.json (train.py's verdict) first, then a failure the runner recorded, then a
    checkpoint to resume from; nothing at all means the run has not started."""
    from ..resume import has_checkpoint

    run_dir = Path(run_dir)
    summary = RunSummary.read(run_dir / "summary.json")  # written by train.py only when a run ends
    if summary is not None:
        status = summary.status
        if status == OK and finite(summary.val_loss):
            return RunState(OK)
        if status == OK:
            return RunState(FAILED, "summary.json has no finite validation loss")
        return RunState(DIVERGED if status == DIVERGED else FAILED,
                        recorded_reason(run_dir) or f"status {status}")
    recorded = read_json(run_dir / STATUS_FILE)
    if recorded and recorded.get("status") in FAILURES:
        return RunState(recorded["status"], recorded.get("reason", ""))
    if has_checkpoint(run_dir / "checkpoints"):
        return RunState(INTERRUPTED, "checkpoint present, no summary")
    return RunState(PENDING)


def recorded_reason(run_dir: Path) -> str:
    recorded = read_json(Path(run_dir) / STATUS_FILE) or {}
    return recorded.get("reason", "")


# ------------------------------------------------------------------------------------------------
# Loading a study for the report


@dataclass
class RunResult:
    run: Run
    directory: Path
    state: RunState
    summary: Optional[RunSummary] = None

    @property
    def val_loss(self) -> Optional[float]:
        return self.summary.val_loss if self.state.status == OK else None

    @property
    def val_curve(self) -> list[tuple[int, float]]:
        if not self.summary:
            return []
        return [(int(s), float(v)) for s, v in self.summary.val_losses or [] if finite(v)]


@dataclass
class Study:
    plan: Plan
    directory: Path
    results: list[RunResult]
    sessions: list[dict] = field(default_factory=list)

    def select(self, size: str, arm: Optional[str] = None) -> list[RunResult]:
        return [r for r in self.results
                if r.run.size == size and (arm is None or r.run.arm == arm)]

    def final_losses(self, size: str, arm: str) -> dict[int, float]:
        """seed -> final validation loss of the arm's successful runs."""
        return {r.run.seed: r.val_loss for r in self.select(size, arm) if r.state.status == OK}

    def wall_time(self) -> float:
        """Seconds the runner was running, summed over its invocations."""
        return float(sum(s.get("seconds", 0.0) for s in self.sessions))


def load_study(directory: str | Path, plan_path: Optional[str | Path] = None) -> Study:
    directory = Path(directory)
    plan_file = Path(plan_path) if plan_path else directory / PLAN_COPY
    if not plan_file.is_file():
        raise FileNotFoundError(f"{directory} holds no {PLAN_COPY}: is it a study directory "
                                f"written by `python -m stratopt_ds.study run`?")
    plan = load_plan(plan_file, check_files=False)  # the runs are done: no data needed
    results = []
    for run in plan.runs():
        run_dir = run.directory(directory)
        state = run_state(run_dir)
        summary = RunSummary.read(run_dir / "summary.json") if state.status in (OK, DIVERGED) else None
        results.append(RunResult(run, run_dir, state, summary))
    sessions = (read_json(directory / STUDY_FILE) or {}).get("sessions", [])
    return Study(plan, directory, results, sessions)


def layer_series(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, layer_norms [steps, layers], layer_alpha [steps, layers]) from metrics.jsonl;
    non-finite norms (logged as null) become NaN."""
    steps, norms, alphas = [], [], []
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        with path.open() as f:
            for line in f:
                record = json.loads(line)
                if "layer_norms" not in record:
                    continue  # an evaluation record
                steps.append(record["step"])
                norms.append([np.nan if x is None else x for x in record["layer_norms"]])
                alphas.append([np.nan if x is None else x for x in record["layer_alpha"]])
    return (np.asarray(steps, dtype=int), np.asarray(norms, dtype=float).reshape(len(steps), -1),
            np.asarray(alphas, dtype=float).reshape(len(steps), -1))
