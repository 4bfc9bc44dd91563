"""`stratopt-study run --executor slurm` on a real two-node slurm (tests/slurm_cluster.py).

The same plan through slurm and here gives the same losses bit for bit; a job that gets slurm's
time-limit warning mid-way checkpoints, is requeued, resumes and ends as if never interrupted; a failing arm is
recorded with slurm's state while the others finish; a run of 2 nodes x 1 rank is one 2-rank
DeepSpeed job whose losses equal a 2-rank run on one node; a second `study run` never submits a
run twice; `study status` and `study cancel` see the jobs.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import CI_PLAN, edited_plan, wait_for_logged_step

from stratopt_ds.study.__main__ import main as study_main
from stratopt_ds.study.results import read_json
from stratopt_ds.study.runner import run_study, study_status
from stratopt_ds.study.slurm import JOB_FILE, SlurmOptions, job_state

pytestmark = [pytest.mark.slurm, pytest.mark.dist]


@pytest.fixture
def on_cluster(slurm_cluster, monkeypatch):
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    return slurm_cluster


def summaries(out: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())
            for p in sorted(out.rglob("summary.json"))}


def plan_file(tmp_path: Path, name: str, **changes) -> Path:
    return edited_plan(tmp_path / f"{name}.yaml", name=name, **changes)


def options(**kwargs) -> SlurmOptions:
    return SlurmOptions(partition="debug", cpus_per_task=1, time_min=10, **kwargs)


def study_in_background(plan: Path, out: Path, local: bool = False,
                        **slurm) -> tuple[threading.Thread, dict]:
    """`study run` in a thread, through slurm (or here: ``local``); the dict gets its counts
    when it returns. The tests train their local references meanwhile."""
    done: dict = {}
    executor = {} if local else {"slurm_options": options(**slurm)}
    runner = threading.Thread(target=lambda: done.update(run_study(
        plan, out, progress=False, **executor)))
    runner.start()
    return runner, done


def warn_and_release(cluster, job: str) -> None:
    """Slurm's time-limit warning to every process of ``job`` (what ``--signal=USR2@120`` sends);
    once submitit has requeued it and its first attempt's processes are gone, start it again at
    once. (Slurm holds a requeued job back ~2 minutes, its BeginTime, so that the end of the
    attempt it requeued is not taken for the end of the next one: released earlier, the new
    attempt is marked FAILED when the old batch script exits.)"""
    cluster.run("scancel", "--signal=USR2", job)
    deadline, pending_since = time.time() + 120, None
    while time.time() < deadline:
        info = job_state(job)
        if info.get("Restarts") == "1" and info["JobState"] == "PENDING":
            pending_since = pending_since or time.time()
            # and the old attempt's srun, which waits up to 4 s for its step, has reported
            if time.time() - pending_since > 6 and not job_processes(info["JobId"]):
                cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
                return
        time.sleep(0.2)
    raise AssertionError(f"job {job} was not requeued: {job_state(job)}")


def job_processes(job_id: str) -> list[psutil.Process]:
    """The processes of slurm job ``job_id`` on this host: its tasks (their SLURM_JOB_ID) and
    its ``slurmstepd: [<job>.<step>]`` (which reports the batch script's end to slurmctld)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SLURM_JOB_ID") == job_id or \
                    f"[{job_id}." in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_ci_tiny_through_slurm_equals_the_local_executor(on_cluster, ci_tiny_study, tmp_path,
                                                         capsys):
    remote = tmp_path / "slurm"
    assert run_study(CI_PLAN, remote, progress=False, slurm_options=options())["ok"] == 4
    a, b = summaries(ci_tiny_study["out"]), summaries(remote)  # the local study: + a diverging arm
    assert len(b) == 4 and set(b) <= set(a)
    for key in b:  # bit for bit: the same TrainConfig, trained on a slurm node
        assert b[key]["losses"] == a[key]["losses"] and b[key]["val_losses"] == a[key]["val_losses"]
    jobs = [read_json(remote / key / JOB_FILE)["jobs"] for key in b]
    assert all(len(j) == 1 for j in jobs) and len({j[0].split("_")[0] for j in jobs}) == 1  # one array
    nodes = {job_state(j[0])["NodeList"] for j in jobs}
    assert nodes <= {"n1", "n2"}
    # done: a second invocation submits nothing; status reads the run directories
    assert run_study(CI_PLAN, remote, progress=False, slurm_options=options())["ok"] == 4
    assert [len(read_json(remote / key / JOB_FILE)["jobs"]) for key in b] == [1] * 4
    assert {state for _, state, _ in study_status(remote)} == {"ok"}
    assert study_main(["status", str(remote)]) == 0
    assert "tiny/adamw/seed0" in capsys.readouterr().out


def test_the_time_limit_warning_checkpoints_and_requeues_and_a_failing_arm_is_recorded(
        on_cluster, tmp_path):
    """One arm gets slurm's time-limit warning mid-way (USR2 to every process of the job, as
    `--signal=USR2@120` sends it): it saves a checkpoint of the step it is in (it has no other:
    save_every is past the end), submitit requeues the job, and it resumes to end bit-identical
    to an uninterrupted run. Another arm asks for CUDA on CPU nodes (the plan check runs
    elsewhere, the run refuses it)."""
    arm = {"name": "stratopt", "optimizer": "stratopt", "steps": 40, "save_every": 100}
    plan = plan_file(tmp_path, "requeue", seeds=[0], baseline="stratopt",
                     arms=[arm, {"name": "gpu", "optimizer": "adamw", "device": "cuda"}])
    reference = tmp_path / "reference"
    uninterrupted, _ = study_in_background(
        plan_file(tmp_path, "reference", seeds=[0], baseline="stratopt", arms=[arm]), reference,
        local=True)
    out, started = tmp_path / "out", time.time()
    runner, done = study_in_background(plan, out)
    run_dir = out / "tiny" / "stratopt" / "seed0"
    warned_at = wait_for_logged_step(run_dir, 8, timeout=120)
    assert 8 <= warned_at < 40 and not (run_dir / "checkpoints").exists()
    job = read_json(run_dir / JOB_FILE)["jobs"][-1]
    warn_and_release(on_cluster, job)
    runner.join(timeout=240)
    uninterrupted.join(timeout=240)
    assert not runner.is_alive()
    assert done["ok"] == 1 and done["failed"] == 1
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert warned_at <= resumed["resumed_from"] < 40  # from the checkpoint the warning made
    assert read_json(run_dir / JOB_FILE)["jobs"] == [job]  # requeued, not submitted again
    event = next(json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()
                 if json.loads(line)["run"] == "tiny/stratopt/seed0")
    assert event["attempts"] == 2 and 0 < event["seconds"] < time.time() - started
    expected = json.loads((reference / "tiny" / "stratopt" / "seed0" / "summary.json").read_text())
    assert resumed["losses"] == expected["losses"] and resumed["val_losses"] == expected["val_losses"]
    failed = read_json(out / "tiny" / "gpu" / "seed0" / "status.json")
    assert failed["status"] == "failed" and failed["slurm_state"] == "FAILED"
    assert "slurm job" in failed["reason"] and "CUDA is not available" in failed["reason"]


def test_two_nodes_one_rank_each_are_one_deepspeed_job_through_a_requeue(on_cluster, two_rank_study,
                                                                          tmp_path):
    """--nodes-per-run 2: the DeepSpeed launcher on each node, one rendezvous. The time-limit
    warning mid-way: both nodes' ranks stop after the same step at one checkpoint, the job is
    requeued and resumes on both nodes; the losses equal an uninterrupted 2-rank run on one node
    (the local executor)."""
    remote = tmp_path / "slurm"
    runner, done = study_in_background(two_rank_study["plan"], remote, nodes_per_run=2,
                                       ranks_per_node=1)
    run_dir = remote / "tiny" / "stratopt" / "seed0"
    warned_at = wait_for_logged_step(run_dir, 5, timeout=120)
    job = read_json(run_dir / JOB_FILE)["jobs"][-1]
    warn_and_release(on_cluster, job)
    runner.join(timeout=240)
    assert not runner.is_alive() and done["ok"] == 1, list((remote / "slurm").rglob("*.err"))
    a, b = two_rank_study["summary"], summaries(remote)["tiny/stratopt/seed0"]
    assert a["ranks"] == b["ranks"] == 2
    assert warned_at <= b["resumed_from"] < 30
    assert b["losses"] == a["losses"] and b["val_losses"] == a["val_losses"]
    assert job_state(job)["NodeList"] in ("n[1-2]", "n1,n2")


def test_cancel_stops_the_studys_jobs(on_cluster, tmp_path):
    """`study cancel` scancels the jobs slurm still holds; like a run the local runner stops, a
    cancelled run is no failure: the next `study run` resumes it."""
    plan = plan_file(tmp_path, "cancel", seeds=[0], baseline="stratopt",
                     arms=[{"name": "stratopt", "optimizer": "stratopt", "steps": 5000,
                            "save_every": 2}])
    out = tmp_path / "out"
    runner, done = study_in_background(plan, out)
    run_dir = out / "tiny" / "stratopt" / "seed0"
    deadline = time.time() + 60
    while time.time() < deadline and not (run_dir / "checkpoints" / "latest").is_file():
        time.sleep(0.2)
    assert [state for _, state, _ in study_status(out)] == ["RUNNING"]
    assert study_main(["cancel", str(out)]) == 0
    runner.join(timeout=60)
    assert not runner.is_alive() and done["interrupted"] == 1 and done["failed"] == 0
    job = read_json(run_dir / JOB_FILE)["jobs"][-1]
    assert job_state(job)["JobState"] == "CANCELLED"
    assert [state for _, state, _ in study_status(out)] == ["interrupted"]
