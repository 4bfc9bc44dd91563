"""The study runner end to end on the tiny model: real training subprocesses, the report with
its tables and figures, skipping finished runs, recording (never re-seeding) a diverging arm,
and resuming a killed run from its checkpoint to the same losses as an uninterrupted one."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stratopt_ds.study.results import DIVERGED, INTERRUPTED, OK, PID_FILE, run_state
from stratopt_ds.study.runner import StudyError, run_study
from stratopt_ds.train_config import TrainConfig
from helpers import DIVERGING_ARM, edited_plan

ROOT = Path(__file__).resolve().parents[1]


def write_plan(directory: Path, edit=None) -> Path:
    return edited_plan(directory / "plan.yaml", edit=edit)


def events(out: Path) -> list[dict]:
    path = out / "runs.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def study(ci_tiny_study):
    """ci_tiny (2 arms x 2 seeds x 20 steps) plus the diverging arm, run with 2 jobs, reported."""
    return ci_tiny_study


@pytest.mark.dist
def test_runs_end_to_end_and_the_diverging_arm_is_recorded(study):
    out = study["out"]
    assert study["counts"][OK] == 4 and study["counts"][DIVERGED] == 2
    for arm in ("adamw", "stratopt"):
        for seed, data_seed in ((0, 100), (1, 101)):
            run_dir = out / "tiny" / arm / f"seed{seed}"
            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["status"] == "ok" and summary["steps_done"] == 20
            assert (summary["seed"], summary["data_seed"]) == (seed, data_seed)
            assert not (run_dir / "checkpoints").exists()  # cleaned once the run succeeded
    for seed in (0, 1):
        status = json.loads((out / "tiny" / "adamw-hot" / f"seed{seed}" / "status.json")
                            .read_text())
        assert status["status"] == DIVERGED and status["returncode"] == 3
        assert status["reason"].startswith("diverged at step")


@pytest.mark.dist
def test_report_has_the_tables_and_counts_the_failures(study):
    report, md = study["report"], study["md"]
    assert report["headline"]["adamw"]["tiny"]["n"] == 2
    hot = report["headline"]["adamw-hot"]["tiny"]
    assert hot["n"] == 0 and hot["failed"] == 2 and hot["mean"] is None
    assert [f["run"] for f in report["failures"]] == ["tiny/adamw-hot/seed0",
                                                      "tiny/adamw-hot/seed1"]
    comparisons = {c["arm"]: c for c in report["comparisons"]["tiny"]}
    assert comparisons["stratopt"]["p"] is not None and comparisons["adamw-hot"]["test"] == "none"
    assert "no layer-adaptive" in report["factorial"]["tiny"]["skipped"]  # no la-* arm here
    assert report["wall_time_s"] > 0 and report["compute_time_s"] > 0
    # The Markdown: headline table in the seed's shape, the significance table, the failures.
    assert "| optimizer | tiny |" in md
    cell = report["headline"]["stratopt"]["tiny"]
    mean, std = cell["mean"], cell["std"]
    assert f"| stratopt | {mean:.4f} ± {std:.4f} (2) |" in md
    assert "| adamw-hot | – (0) [2 failed] |" in md
    assert ("| arm | Δ mean | 99% CI | p | Holm p | significant | Hedges' g | TOST p (±0.01) |"
            in md)
    assert "| tiny/adamw-hot/seed0 | diverged | diverged at step" in md
    assert "wall time of the study" in md


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 250
        return np.asarray(image.convert("RGB")).astype(int)


def share(px: np.ndarray, rgb: tuple[int, int, int], tol: int = 30) -> float:
    """Fraction of pixels within tol of a colour."""
    return float((np.abs(px - np.array(rgb)).max(axis=-1) <= tol).mean())


TAB_BLUE, TAB_RED, BLACK = (31, 119, 180), (214, 39, 40), (0, 0, 0)


@pytest.mark.dist
def test_plots_are_pngs_that_show_what_they_claim(study):
    out, plots = study["out"] / "report", study["report"]["plots"]["tiny"]
    assert set(plots) == {"val_curves", "final_loss", "grad_norm_heatmap", "layer_grad_norms", "alpha"}
    for name in plots:
        assert f"]({plots[name]})" in study["md"]
        px = pixels(out / plots[name])
        assert len(np.unique(px.reshape(-1, 3), axis=0)) > 50  # not blank, not a single colour
    curves = pixels(out / plots["val_curves"])   # the AdamW baseline in black, StratOpt in blue
    assert share(curves, BLACK, 40) > 0.002 and share(curves, TAB_BLUE) > 0.002
    strip = pixels(out / plots["final_loss"])
    assert share(strip, TAB_BLUE, 60) > 0.0001   # two markers of StratOpt's seeds
    heat = pixels(out / plots["grad_norm_heatmap"])  # RdBu: layers above and below the median
    reds = ((heat[..., 0] > 150) & (heat[..., 2] < 120)).mean()
    blues = ((heat[..., 2] > 150) & (heat[..., 0] < 120)).mean()
    assert reds > 0.01 and blues > 0.01
    alpha = pixels(out / plots["alpha"])      # boxes (blue) with median lines (red)
    assert share(alpha, TAB_BLUE, 60) > 0.0002 and share(alpha, TAB_RED, 60) > 0.0001


@pytest.mark.dist
def test_rerun_skips_finished_and_failed_runs_and_retry_keeps_the_seeds(study):
    out, plan = study["out"], study["plan"]
    before = events(out)
    assert len(before) == 6
    counts = run_study(plan, out, jobs=2, progress=False)
    assert counts[OK] == 4 and counts[DIVERGED] == 2 and events(out) == before  # nothing ran
    counts = run_study(plan, out, jobs=2, retry_failed=True, progress=False)
    retried = events(out)[6:]
    assert sorted(e["run"] for e in retried) == ["tiny/adamw-hot/seed0", "tiny/adamw-hot/seed1"]
    assert counts[DIVERGED] == 2  # the same seeds diverge again: a failure is not re-seeded away
    summary = json.loads((out / "tiny" / "adamw-hot" / "seed1" / "summary.json").read_text())
    assert (summary["seed"], summary["data_seed"]) == (1, 101)


@pytest.mark.dist
def test_a_changed_plan_cannot_reuse_the_study_directory(study, tmp_path):
    changed = write_plan(tmp_path, lambda p: (p["arms"].append(DIVERGING_ARM),
                                              p["train"].update(steps=30)))
    with pytest.raises(StudyError, match="was run with other settings \\(steps"):
        run_study(changed, study["out"], progress=False)
    assert yaml.safe_load((study["out"] / "plan.yaml").read_text())["train"]["steps"] == 20


def long_single_run(p: dict) -> None:
    p["arms"] = [p["arms"][0]]
    p["seeds"] = {"init": [0], "data": [100]}
    p["train"].update(steps=60, save_every=10, eval_every=30)


def test_killed_run_resumes_from_its_checkpoint_with_the_same_losses(tmp_path, monkeypatch):
    # One thread per run: the tiny model gains nothing from two, and on a busy machine spinning
    # OpenMP threads make each step several times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = write_plan(tmp_path, long_single_run)
    out = tmp_path / "killed"
    run_dir = out / "tiny" / "adamw" / "seed0"
    runner = subprocess.Popen([sys.executable, "-m", "stratopt_ds.study", "run", str(plan),
                               "--out", str(out), "--no-progress"], cwd=ROOT,
                              start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "latest").is_file():
        assert runner.poll() is None and time.time() < deadline, runner.stderr.read()
        time.sleep(0.01)
    trainer = int((run_dir / PID_FILE).read_text())
    runner.send_signal(signal.SIGTERM)  # the runner stops its run and records no failure
    assert runner.wait(timeout=60) == 143
    assert trainer_gone(trainer)
    assert run_state(run_dir).status == INTERRUPTED
    assert not (run_dir / "summary.json").exists() and not (run_dir / "status.json").exists()
    assert events(out) == []

    assert run_study(plan, out, progress=False)[OK] == 1
    assert [e["resumed"] for e in events(out)] == [True]
    log = (run_dir / "train.log").read_text()
    attempts = [line for line in log.splitlines() if line.startswith("==== ")]
    assert len(attempts) == 2 and " start: " in attempts[0] and " resume: " in attempts[1]
    assert TrainConfig.read(run_dir / "train_config.json").resume  # the last attempt's config
    assert "resumed from" in log
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert 10 <= resumed["resumed_from"] < 60

    reference = tmp_path / "straight"
    assert run_study(plan, reference, progress=False)[OK] == 1
    straight = json.loads((reference / "tiny" / "adamw" / "seed0" / "summary.json").read_text())
    assert straight["resumed_from"] is None and len(resumed["losses"]) == 60
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in resumed["val_losses"]],
                               [v for _, v in straight["val_losses"]], rtol=1e-6)


def trainer_gone(pid: int) -> bool:
    """The pid may exist again as an unrelated process; ours would still name stratopt_ds.train."""
    try:
        return b"stratopt_ds.train" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def test_epochs_with_the_default_data_source(tmp_path):
    """A plan that gives epochs and no train.data uses stratopt_ds.train's default, 'auto'
    (synthetic here, offline): the plan accepts it as a name, not a path, and the epoch length
    is computed from the corpus the run will build."""
    from stratopt_ds import data
    from stratopt_ds.study.plan import load_plan
    from stratopt_ds.study.runner import epoch_steps

    def edit(raw):
        del raw["train"]["data"], raw["train"]["steps"]
        raw["train"]["epochs"] = 1

    plan = load_plan(write_plan(tmp_path, edit))
    run = plan.runs()[0]
    assert "data" not in run.train
    steps = epoch_steps(run)
    # the store stratopt_ds.train itself will open for these options (built once, cached)
    windows = len(data.DataRequest("synthetic", 32, max_docs=400, val_windows=16).open().train)
    assert steps == windows // 8 > 0


def test_epoch_lengths_are_counted_once_before_runs_start(tmp_path, monkeypatch):
    """With --jobs 2 and an epochs plan, the store behind the epoch length is opened (built if
    need be) in the runner's own thread, once per run spec, before any run starts (worker
    threads would start the same build side by side)."""
    import threading

    from stratopt_ds import data
    from stratopt_ds.study.runner import StudyRunner

    def edit(raw):
        del raw["train"]["steps"]
        raw["train"]["epochs"] = 1

    plan_file = write_plan(tmp_path, edit)
    builds, real = [], data.DataRequest.open
    monkeypatch.setattr(data.DataRequest, "open",
                        lambda *a, **k: builds.append(threading.current_thread()) or real(*a, **k))
    started = []
    monkeypatch.setattr(StudyRunner, "execute", lambda self, todo, done: started.append(
        (len(todo), {run.key for run in todo} <= set(self.specs))))
    run_study(plan_file, tmp_path / "out", jobs=2, progress=False)
    from stratopt_ds.study.plan import load_plan
    assert set(builds) == {threading.main_thread()}
    assert len(builds) == len(load_plan(plan_file).runs())  # one open per run's spec, none later
    assert started[0][0] > 1 and started[0][1]  # several runs, every spec made before they start


def test_slurm_attempt_time_is_read_from_submitits_log_without_queue_time(tmp_path):
    """Each start of a requeued job (its first attempt, the requeue) counts from submitit's
    "Starting with" line to its last line; a last attempt killed before it logged its end counts
    until slurm's EndTime; the time in the queue between them counts nowhere."""
    from stratopt_ds.study.slurm import attempt_seconds

    log = tmp_path / "7_0_log.out"
    log.write_text(
        "submitit INFO (2026-12-06 07:00:00,100) - Starting with JobEnvironment(job_id=7)\n"
        "stratopt {'lr': 0.003} | tiny: 132,032 params\n"
        "submitit INFO (2026-12-06 07:00:30,900) - Exiting gracefully after preemption/timeout.\n"
        "submitit INFO (2026-12-06 07:10:00,000) - Starting with JobEnvironment(job_id=7)\n"
        "submitit INFO (2026-12-06 07:10:45,000) - Job completed successfully\n"
        "submitit INFO (2026-12-06 07:20:00,000) - Starting with JobEnvironment(job_id=7)\n")
    assert attempt_seconds(log, "2026-12-06T07:20:12") == [30.0, 45.0, 12.0]
    assert attempt_seconds(log) == [30.0, 45.0, 0.0]  # slurm forgot the job: a lower bound
    assert attempt_seconds(tmp_path / "missing.out") == []


def test_a_run_stopped_by_the_stop_signal_is_interrupted_not_failed(tmp_path):
    """Exit code 75 with a checkpoint: the study resumes the run; 75 without one is a failure."""
    from stratopt_ds.preemption import EXIT_STOPPED
    from stratopt_ds.study.runner import StudyRunner

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_7").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_7" / "run.json").write_text("{}")  # its save finished
    (run_dir / "checkpoints" / "latest").write_text("step_7\n")
    assert StudyRunner.outcome(run_dir, EXIT_STOPPED).status == INTERRUPTED
    assert StudyRunner.outcome(tmp_path / "empty", EXIT_STOPPED).status == "failed"


LAUNCHER_LIKE = """
import signal, subprocess, sys
signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # the launcher ignores it; its rank acts on it
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=sys.stdout)
sys.exit(rank.wait())
"""
RANK_LIKE = """
import signal, sys, time
signal.signal(signal.SIGUSR2, lambda *_: sys.exit({code}))
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("rank_exits, requeued", [(75, True), (0, False), (1, False)])
def test_the_warning_handler_passes_the_signal_to_the_ranks_and_requeues_only_a_stopped_run(
        tmp_path, rank_exits, requeued):
    """TrainJob.checkpoint (submitit's handler of slurm's time-limit warning) signals the whole
    process tree under it (a launcher that ignores the signal, a rank that acts on it), waits
    for it to exit, and requeues only a run that stopped at a checkpoint (exit 75): a run that
    finished (0) or failed meanwhile ends the job instead (None)."""
    from stratopt_ds.study.slurm import TrainJob

    job = TrainJob(1, stop_wait_s=30)
    job._child = subprocess.Popen([sys.executable, "-c", LAUNCHER_LIKE,
                                   RANK_LIKE.format(code=rank_exits)],
                                  stdout=subprocess.PIPE, text=True)
    assert job._child.stdout.readline().strip() == "ready"  # the rank's handler is installed
    started = time.monotonic()
    delayed = job.checkpoint("train_config.json", str(tmp_path), False)
    assert time.monotonic() - started < 20 and job._child.poll() is not None
    if requeued:
        assert delayed.args == ("train_config.json", str(tmp_path), False)
        assert isinstance(delayed.function, TrainJob) and delayed.function._child is None
    else:
        assert delayed is None
    (tmp_path / "summary.json").write_text("{}")  # a finished run is never requeued
    job._child = None
    assert job.checkpoint("train_config.json", str(tmp_path), False) is None
