"""Run every job of a plan through the training entry, resumably, and record every failure.

Each run is a :class:`~stratopt_ds.train_config.TrainConfig` that the plan builds, written to
``<run>/train_config.json`` and trained in a subprocess: ``python -m stratopt_ds.train --config
<run>/train_config.json`` on one process, or under the ``deepspeed`` launcher when the plan's
size names a DeepSpeed config. On each invocation a run is

* skipped when it finished (summary.json with status ok),
* skipped and counted as a failure when it diverged or crashed before (``--retry-failed`` runs
  it again with the *same* seeds: a failure is never re-seeded),
* resumed with ``--resume`` when it has a complete checkpoint but no summary (it was killed),
* started from scratch otherwise.

A run that is killed by the runner itself (Ctrl-C / SIGTERM) is not a failure: it resumes next time.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from ..preemption import EXIT_STOPPED
from ..summary import RunSummary
from . import slurm
from .plan import Plan, Run, data_request, deepspeed_config, load_plan, steps_of_epochs
from .results import (DIVERGED, EVENTS_FILE, FAILED, FAILURES, INTERRUPTED, LOG_FILE, OK, PENDING,
                      PID_FILE, PLAN_COPY, SPEC_FILE, STATUS_FILE, STUDY_FILE, RunState, read_json,
                      run_state)


class StudyError(RuntimeError):
    """The study cannot go on as asked (the message says why and what to do)."""


class Interrupted(Exception):
    """SIGTERM, turned into an exception so the runner stops its runs and keeps their state."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_study(plan_path: str | Path, out: str | Path, jobs: int = 1, retry_failed: bool = False,
              progress: bool = True,
              slurm_options: Optional["slurm.SlurmOptions"] = None) -> dict[str, int]:
    """Run what is left of the plan's runs, here or as slurm jobs (``slurm_options``); return
    the count of runs per final state."""
    plan = load_plan(plan_path)
    out = Path(out).resolve()  # slurm jobs run elsewhere: every path they get is absolute
    if jobs < 1:
        raise StudyError(f"--jobs must be >= 1, got {jobs}")
    if slurm_options is not None and (missing := slurm.slurm_available()):
        raise StudyError(f"--executor slurm: {missing}")
    if slurm_options is None and jobs > 1 and any(size.deepspeed for size in plan.sizes):
        raise StudyError(f"--jobs {jobs}: this plan launches deepspeed on all GPUs of the machine; "
                         f"run its jobs one at a time (--jobs 1)")
    out.mkdir(parents=True, exist_ok=True)
    with study_lock(out):
        return StudyRunner(plan, Path(plan_path), out, jobs, retry_failed, progress,
                           slurm_options).run()


@contextlib.contextmanager
def study_lock(out: Path):
    """One runner per study directory: two would train the same run twice."""
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(f"another runner is working on {out}") from None
        yield


class StudyRunner:
    poll_seconds = 2.0  # how often slurm is asked about the study's jobs

    def __init__(self, plan: Plan, plan_file: Path, out: Path, jobs: int, retry_failed: bool,
                 progress: bool, slurm_options: Optional["slurm.SlurmOptions"] = None):
        self.plan, self.plan_file, self.out, self.jobs = plan, plan_file, out, jobs
        self.slurm = slurm_options  # None: runs here, as subprocesses
        self.retry_failed, self.progress = retry_failed, progress
        self.stopping = threading.Event()
        self.active: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.specs: dict[str, dict[str, Any]] = {}  # run key -> spec, filled by run() up front

    # -- planning --------------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        runs = self.plan.runs()
        # Every spec once, in order, in this thread: an epoch count may build a source's store,
        # which the runs then read (worker threads would start the same build side by side).
        self.specs = {run.key: self.spec(run) for run in runs}
        states = {run.key: self.prepare(run) for run in runs}  # refuses a conflicting study
        shutil.copyfile(self.plan_file, self.out / PLAN_COPY)   # the report reads it from here
        todo = [run for run in runs if states[run.key].status in (PENDING, INTERRUPTED)]
        counts = {s: sum(st.status == s for st in states.values())
                  for s in (OK, DIVERGED, FAILED)}
        print(f"study {self.plan.name}: {len(runs)} runs | {counts[OK]} done, "
              f"{counts[DIVERGED] + counts[FAILED]} failed earlier (not retried), "
              f"{len(todo)} to run | {self.out}", file=sys.stderr)
        started = time.time()
        session = {"started": now(), "runs_to_do": len(todo)}
        try:
            if self.slurm is not None:
                self.execute_slurm(todo, done=len(runs) - len(todo))
            else:
                self.execute(todo, done=len(runs) - len(todo))
        finally:
            session.update(ended=now(), seconds=time.time() - started,
                           interrupted=self.stopping.is_set())
            self.record_session(session)
        final = [run_state(run.directory(self.out)).status for run in runs]
        return {s: final.count(s) for s in (OK, DIVERGED, FAILED, INTERRUPTED, PENDING)}

    def prepare(self, run: Run) -> RunState:
        """The run's state; clears an old failure first when --retry-failed asks for it."""
        run_dir = run.directory(self.out)
        self.check_not_running(run, run_dir)
        self.check_same_spec(run, run_dir)
        state = run_state(run_dir)
        if state.status in FAILURES and self.retry_failed:
            # Same seeds, same options: resumes from its newest checkpoint if it has one.
            for name in ("summary.json", STATUS_FILE):
                (run_dir / name).unlink(missing_ok=True)
            state = run_state(run_dir)
        return state

    def check_same_spec(self, run: Run, run_dir: Path) -> None:
        saved = read_json(run_dir / SPEC_FILE)
        if saved is None:
            return
        if "train_config" not in saved and "train_args" in saved:
            saved["train_config"] = config_of_train_args(saved.pop("train_args"))  # an earlier version's
        mine = json.loads(json.dumps(self.specs[run.key]))
        changed = [k for k in mine if saved.get(k) != mine[k]]
        if changed:
            raise StudyError(f"{run_dir} was run with other settings ({', '.join(changed)}: "
                             f"{[saved.get(k) for k in changed]} before, "
                             f"{[mine[k] for k in changed]} now); use another --out")

    @staticmethod
    def check_not_running(run: Run, run_dir: Path) -> None:
        """A training process left behind by a runner that was killed may still be writing."""
        pid_file = run_dir / PID_FILE
        if not pid_file.is_file():
            return
        pid = pid_file.read_text().strip()
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, ValueError):
            cmdline = ""
        if str(run_dir) in cmdline:
            raise StudyError(f"run {run.key} is still being trained by process {pid} (left by an "
                             f"earlier runner); wait for it to end or kill it")
        pid_file.unlink(missing_ok=True)

    # -- execution -------------------------------------------------------------------------------

    def execute(self, todo: list[Run], done: int) -> None:
        bar = tqdm(total=done + len(todo), initial=done, desc=f"study {self.plan.name}",
                   unit="run", disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        failed = 0
        previous = signal.signal(signal.SIGTERM, raise_interrupted) \
            if threading.current_thread() is threading.main_thread() else None
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            futures = {pool.submit(self.train, run): run for run in todo}
            for future in as_completed(futures):
                state = future.result()
                if state is None:
                    continue  # stopped by us
                if state.status == INTERRUPTED:  # the stop signal, sent to the run by hand
                    bar.write(f"{state.reason}: {futures[future].key}; it resumes on the next run")
                    continue
                if state.status in FAILURES:
                    failed += 1
                    bar.write(f"FAILED {futures[future].key}: {state.status}: {state.reason}")
                bar.update(1)
                bar.set_postfix(failed=failed)
        except BaseException as e:  # Ctrl-C, SIGTERM, or a run that could not be launched
            self.stop()
            if isinstance(e, (KeyboardInterrupt, Interrupted)):
                bar.write("interrupted: running runs were stopped; they resume from their last "
                          "checkpoint on the next invocation")
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def stop(self) -> None:
        """Stop every running run (the whole process group: the deepspeed launcher has children)."""
        with self.lock:  # no run can start after this (train() checks under the same lock)
            self.stopping.set()
            procs = list(self.active.values())
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

    def train(self, run: Run) -> Optional[RunState]:
        """One attempt at one run; None when the runner stopped it."""
        if self.stopping.is_set():
            return None
        run_dir = run.directory(self.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        resume = run_state(run_dir).status == INTERRUPTED
        spec = self.specs[run.key]
        (run_dir / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")
        argv = self.command(run, run_dir, spec["steps"], resume)
        started = time.time()
        with open(run_dir / LOG_FILE, "a") as log:
            log.write(f"\n==== {now()} {'resume' if resume else 'start'}: {' '.join(argv)}\n")
            log.flush()
            # A session of its own: Ctrl-C reaches only the runner, which then stops the run
            # itself (and knows it did), instead of the run dying first and looking failed.
            with self.lock:
                if self.stopping.is_set():
                    return None
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=self.environment())
                self.active[run.key] = proc
            (run_dir / PID_FILE).write_text(str(proc.pid))
            returncode = proc.wait()
        with self.lock:
            self.active.pop(run.key, None)
        (run_dir / PID_FILE).unlink(missing_ok=True)
        if self.stopping.is_set():
            return None
        return self.record(run, self.outcome(run_dir, returncode),
                           {"returncode": returncode, "resumed": resume,
                            "seconds": time.time() - started})

    def record(self, run: Run, state: RunState, details: dict[str, Any]) -> RunState:
        """The attempt's outcome: <run>/status.json, a line of runs.jsonl, checkpoints cleaned."""
        run_dir = run.directory(self.out)
        record = {"run": run.key, "status": state.status, "reason": state.reason, **details,
                  "finished": now()}
        (run_dir / STATUS_FILE).write_text(json.dumps(record, indent=1) + "\n")
        with self.lock, open(self.out / EVENTS_FILE, "a") as events:
            events.write(json.dumps(record) + "\n")
        if state.status == OK and self.plan.cleanup_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return state

    @staticmethod
    def outcome(run_dir: Path, returncode: int, why: Optional[str] = None) -> RunState:
        """train.py's own verdict when it wrote one; otherwise ``why`` (slurm's state and reason)
        or the exit code, and the log's end."""
        state = run_state(run_dir)
        if state.status == INTERRUPTED and returncode == EXIT_STOPPED:  # the stop signal
            return RunState(INTERRUPTED, "stopped at a checkpoint by the stop signal")
        if state.status == DIVERGED:
            return RunState(DIVERGED, divergence_reason(RunSummary.read(run_dir / "summary.json") or RunSummary()))
        if state.status in (OK, FAILED):
            return state
        log = run_dir / LOG_FILE
        if why is not None:
            log = Path((slurm.read_record(run_dir) or {}).get("log", log))
        return RunState(FAILED, f"{why or f'exit code {returncode}'}, no summary.json; log: "
                                f"{last_line(log, prefer='stratopt-train: error:')}")

    # -- slurm -----------------------------------------------------------------------------------

    def execute_slurm(self, todo: list[Run], done: int) -> None:
        """Submit what is not queued yet as one job array, then follow every job to its end.
        A run whose job an earlier invocation submitted and slurm still holds is never
        submitted again; an interrupted runner leaves the jobs running (study cancel stops them)."""
        waiting, to_submit, states = {}, [], slurm.job_states()
        for run in todo:
            run_dir = run.directory(self.out)
            run_dir.mkdir(parents=True, exist_ok=True)
            job = slurm.last_job(run_dir)
            if slurm.is_active(job, states):
                waiting[run.key] = (run, job)
                continue
            spec = self.specs[run.key]
            (run_dir / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")
            to_submit.append((run, self.write_config(run, run_dir, spec["steps"], resume=False)))
        if to_submit:
            ids = slurm.submit(self.slurm, self.plan.name,
                               [(run.key, path, run.directory(self.out), run.deepspeed is not None)
                                for run, path in to_submit])
            waiting.update({run.key: (run, job) for (run, _), job in zip(to_submit, ids)})
            print(f"submitted {len(ids)} job(s): {ids[0]}{' ...' if len(ids) > 1 else ''}",
                  file=sys.stderr)
        bar = tqdm(total=done + len(todo), initial=done, desc=f"study {self.plan.name} (slurm)",
                   unit="run", disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        try:
            while waiting:
                states = slurm.job_states()  # one query per poll for the whole study
                for key, (run, job) in list(waiting.items()):
                    info = slurm.job_state(job, states)
                    if info["JobState"] in slurm.ACTIVE:
                        continue
                    del waiting[key]
                    state = self.slurm_outcome(run, job, info)
                    if state.status == INTERRUPTED:
                        bar.write(f"{state.reason}: {key} (job {job}); it resumes on the next run")
                        continue
                    if state.status in FAILURES:
                        bar.write(f"FAILED {key}: {state.status}: {state.reason}")
                    bar.update(1)
                time.sleep(self.poll_seconds if waiting else 0)
        finally:
            bar.close()

    def slurm_outcome(self, run: Run, job: str, info: dict[str, str]) -> RunState:
        """A run whose job slurm has finished: its state, recorded with slurm's view and the wall
        time of the job's attempts (not its time in the queue). A cancelled job (study cancel,
        scancel) or one that ended at the stop signal's checkpoint without being requeued is no
        failure: like a run the local runner stops itself, it resumes on the next study run."""
        run_dir = run.directory(self.out)
        spans = slurm.attempt_seconds((slurm.read_record(run_dir) or {}).get("stdout", ""),
                                      info.get("EndTime"))
        if info["JobState"] == "CANCELLED":
            state = RunState(INTERRUPTED, "cancelled")
        elif info["JobState"] == "COMPLETED" and run_state(run_dir).status == INTERRUPTED:
            state = RunState(INTERRUPTED, "stopped at a checkpoint")
        else:
            code = int(info.get("ExitCode", "0:0").split(":")[0] or 0)
            why = (f"slurm job {job} {info['JobState']} (reason {info.get('Reason', '?')}, "
                   f"exit {info.get('ExitCode', '?')})")
            state = self.outcome(run_dir, code, why)
        return self.record(run, state, {"job": job, "slurm_state": info["JobState"],
                                        "slurm_reason": info.get("Reason"),
                                        "attempts": len(spans), "seconds": sum(spans)})

    # -- commands --------------------------------------------------------------------------------

    def spec(self, run: Run) -> dict[str, Any]:
        """Everything that defines the run; a later invocation must agree with it."""
        steps = self.steps(run)
        return {"run": run.key, "seed": run.seed, "data_seed": run.data_seed, "steps": steps,
                "train_config": run.train_config(steps).to_dict(),
                "deepspeed": run.deepspeed and vars(run.deepspeed)}

    def write_config(self, run: Run, run_dir: Path, steps: int, resume: bool) -> Path:
        """The run's TrainConfig for this attempt, as <run>/train_config.json."""
        config = run.train_config(steps).replace(out=str(run_dir), resume=resume, progress=False)
        if "save_every" not in run.train:  # resumable by default: ~10 checkpoints per run
            config = config.replace(save_every=max(1, math.ceil(steps / 10)))
        if run.deepspeed is not None:
            config = config.replace(deepspeed_config=str(write_deepspeed_config(run, run_dir)))
        path = run_dir / "train_config.json"
        config.write(path)
        return path

    def command(self, run: Run, run_dir: Path, steps: int, resume: bool) -> list[str]:
        """Write the run's TrainConfig for this attempt; the command that trains it here."""
        path = self.write_config(run, run_dir, steps, resume)
        if run.deepspeed is None:
            return [sys.executable, "-m", "stratopt_ds.train", "--config", str(path)]
        launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
        return [launcher, "--num_gpus", str(run.deepspeed.num_gpus), "--module",
                "stratopt_ds.train", "--config", str(path)]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.jobs > 1 and "OMP_NUM_THREADS" not in env:  # share the cores, don't fight over them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))
        return env

    def steps(self, run: Run) -> int:
        """The plan's steps, or its epochs turned into steps (from the store's manifest)."""
        if "steps" in run.train:
            return int(run.train["steps"])
        return epoch_steps(run)

    def record_session(self, session: dict) -> None:
        path = self.out / STUDY_FILE
        study = read_json(path) or {"plan": self.plan.name, "sessions": []}
        study["sessions"].append(session)
        path.write_text(json.dumps(study, indent=1) + "\n")


def config_of_train_args(argv: list[str]) -> dict[str, Any]:
    """The TrainConfig that a run spec of an earlier version (an argument list) stands for."""
    from ..train_config import build_parser, from_args

    return from_args(build_parser(), argv).to_dict()


def failed_runs(plan: Plan, out: str | Path) -> list[tuple[str, RunState]]:
    """(key, state) of every run of ``plan`` in ``out`` that diverged or failed, in plan order:
    this session's failures and earlier ones not retried alike."""
    states = ((run.key, run_state(run.directory(Path(out)))) for run in plan.runs())
    return [(key, state) for key, state in states if state.status in FAILURES]


def _plan_of(directory: str | Path) -> Plan:
    path = Path(directory) / PLAN_COPY
    if not path.is_file():
        raise StudyError(f"{directory} is not a study directory (no {PLAN_COPY})")
    return load_plan(path, check_files=False)


def study_status(directory: str | Path) -> list[tuple[str, str, Optional[str]]]:
    """(run, state, slurm job) of every run: slurm's state (PENDING, RUNNING, REQUEUED, ...)
    while it holds the run's job, else the run directory's (ok, diverged, failed, ...)."""
    out, states = [], slurm.job_states()
    for run in _plan_of(directory).runs():
        run_dir = run.directory(Path(directory))
        job = slurm.last_job(run_dir)
        live = slurm.job_state(job, states)["JobState"] if job else None
        out.append((run.key, live if live in slurm.ACTIVE else run_state(run_dir).status, job))
    return out


def cancel_study(directory: str | Path) -> list[str]:
    """Cancel every job of the study that slurm still holds; return their ids."""
    jobs = [job for _, state, job in study_status(directory) if job and state in slurm.ACTIVE]
    slurm.cancel(jobs)
    return jobs


def raise_interrupted(signum, frame) -> None:
    raise Interrupted()


def write_deepspeed_config(run: Run, run_dir: Path) -> Path:
    """The shipped config as the run gets it (:func:`stratopt_ds.study.plan.deepspeed_config`)."""
    path = run_dir / "ds_config.json"
    path.write_text(json.dumps(deepspeed_config(run.deepspeed), indent=1) + "\n")
    return path


def epoch_steps(run: Run) -> int:
    """steps = epochs x training windows / batch size, of the store the run will read (a source
    is built into the store cache here, once, as the run itself would build it)."""
    return steps_of_epochs(run, len(data_request(run, sized=False).open(progress=False).train))


def divergence_reason(summary: RunSummary) -> str:
    done, total = summary.steps_done, summary.steps
    if done < total:
        return (f"diverged at step {done} of {total}: non-finite loss or skipped updates "
                f"(last loss {summary.last_loss})")
    return f"diverged: final validation loss {summary.val_loss} is not finite"


def last_line(path: Path, prefer: Optional[str] = None) -> str:
    """The log's last line (its last line starting with ``prefer``, when there is one: a
    training error under a launcher's or submitit's traceback)."""
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines()]
    except FileNotFoundError:
        return "(no log)"
    lines = [line for line in lines if line and not line.startswith("====")]
    preferred = [line for line in lines if prefer and line.startswith(prefer)]
    return (preferred or lines or ["(empty log)"])[-1][:300]
