"""`stratopt-study run --executor slurm` on a real two-node slurm (tests/slurm_cluster.py).

The same plan through slurm and here gives the same losses bit for bit; a job that slurm
requeues mid-way resumes from its checkpoint and ends as if never interrupted; a failing arm is
recorded with slurm's state while the others finish; a run of 2 nodes x 1 rank is one 2-rank
DeepSpeed job whose losses equal a 2-rank run on one node; a second `study run` never submits a
run twice; `study status` and `study cancel` see the jobs.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from stratopt_ds.study.__main__ import main as study_main
from stratopt_ds.study.results import read_json
from stratopt_ds.study.runner import run_study, study_status
from stratopt_ds.study.slurm import JOB_FILE, SlurmOptions, job_state

pytestmark = [pytest.mark.slurm, pytest.mark.dist]
ROOT = Path(__file__).resolve().parents[1]
CI_PLAN = ROOT / "stratopt_ds" / "study" / "plans" / "ci_tiny.yaml"


@pytest.fixture
def on_cluster(slurm_cluster, monkeypatch):
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    return slurm_cluster


def summaries(out: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())
            for p in sorted(out.rglob("summary.json"))}


def plan_file(tmp_path: Path, name: str, **changes) -> Path:
    raw = yaml.safe_load(CI_PLAN.read_text())
    raw["name"] = name
    for key, value in changes.items():
        raw[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def options(**kwargs) -> SlurmOptions:
    return SlurmOptions(partition="debug", cpus_per_task=1, time_min=10, **kwargs)


def study_in_background(plan: Path, out: Path) -> tuple[threading.Thread, dict]:
    """`study run --executor slurm` in a thread; the dict gets its counts when it returns."""
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(run_study(
        plan, out, progress=False, slurm_options=options())))
    runner.start()
    return runner, done


def test_ci_tiny_through_slurm_equals_the_local_executor(on_cluster, tmp_path, capsys):
    local, remote = tmp_path / "local", tmp_path / "slurm"
    assert run_study(CI_PLAN, local, jobs=2, progress=False)["ok"] == 4
    assert run_study(CI_PLAN, remote, progress=False, slurm_options=options())["ok"] == 4
    a, b = summaries(local), summaries(remote)
    assert sorted(a) == sorted(b) and len(a) == 4
    for key in a:  # bit for bit: the same TrainConfig, trained on a slurm node
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


def test_a_requeued_job_resumes_and_a_failing_arm_is_recorded(on_cluster, tmp_path):
    """One arm runs long enough to be requeued by `scontrol requeue` after its first checkpoint;
    another asks for CUDA on CPU nodes (the plan check runs elsewhere, the run refuses it)."""
    plan = plan_file(tmp_path, "requeue", seeds=[0], baseline="stratopt",
                     arms=[{"name": "stratopt", "optimizer": "stratopt", "steps": 40,
                            "save_every": 5},
                           {"name": "gpu", "optimizer": "adamw", "device": "cuda"}])
    reference = tmp_path / "reference"
    run_study(plan_file(tmp_path, "reference", seeds=[0], baseline="stratopt",
                        arms=[{"name": "stratopt", "optimizer": "stratopt", "steps": 40,
                               "save_every": 5}]), reference, progress=False)
    out = tmp_path / "out"
    runner, done = study_in_background(plan, out)
    run_dir = out / "tiny" / "stratopt" / "seed0"
    deadline = time.time() + 120
    while time.time() < deadline:
        latest = run_dir / "checkpoints" / "latest"
        if latest.is_file() and latest.read_text().strip() not in ("", "step_5"):
            break
        time.sleep(0.2)
    job = read_json(run_dir / JOB_FILE)["jobs"][-1]
    requeued_at = (run_dir / "checkpoints" / "latest").read_text().strip()
    on_cluster.run("scontrol", "requeue", job)
    # slurm holds a requeued job back ~2 minutes (its BeginTime): let it start again now
    while job_state(job)["JobState"] not in ("PENDING", "RUNNING", "COMPLETED"):
        time.sleep(0.2)
    on_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    runner.join(timeout=240)
    assert not runner.is_alive()
    assert done["ok"] == 1 and done["failed"] == 1
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["resumed_from"] is not None, requeued_at  # it did restart from a checkpoint
    expected = json.loads((reference / "tiny" / "stratopt" / "seed0" / "summary.json").read_text())
    assert resumed["losses"] == expected["losses"] and resumed["val_losses"] == expected["val_losses"]
    failed = read_json(out / "tiny" / "gpu" / "seed0" / "status.json")
    assert failed["status"] == "failed" and failed["slurm_state"] == "FAILED"
    assert "slurm job" in failed["reason"] and "CUDA is not available" in failed["reason"]


def test_two_nodes_one_rank_each_are_one_deepspeed_job(on_cluster, tmp_path):
    """--nodes-per-run 2: the DeepSpeed launcher on each node, one rendezvous; the losses equal
    a 2-rank run on one node (the local executor)."""
    sizes = {"tiny": {"preset": "tiny", "batch_size": 16,
                      "deepspeed": {"config": str(ROOT / "ds_configs" / "tiny_zero2_cpu.json"),
                                    "num_gpus": 2}}}
    plan = plan_file(tmp_path, "two_nodes", seeds=[0], sizes=sizes, arms=["stratopt"],
                     baseline="stratopt")
    local, remote = tmp_path / "local", tmp_path / "slurm"
    assert run_study(plan, local, progress=False)["ok"] == 1
    counts = run_study(plan, remote, progress=False,
                       slurm_options=options(nodes_per_run=2, ranks_per_node=1))
    assert counts["ok"] == 1, (remote / "slurm").glob("*")
    a, b = summaries(local)["tiny/stratopt/seed0"], summaries(remote)["tiny/stratopt/seed0"]
    assert a["ranks"] == b["ranks"] == 2
    assert b["losses"] == a["losses"] and b["val_losses"] == a["val_losses"]
    job = read_json(remote / "tiny" / "stratopt" / "seed0" / JOB_FILE)["jobs"][0]
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
