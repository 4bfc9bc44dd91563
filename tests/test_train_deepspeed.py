"""The main job under the real `deepspeed` launcher: 2 CPU ranks, ZeRO-2, StratOpt from the JSON.

One launch trains 20 steps with checkpoints from a token store; a second resumes a copy of it from
step 10 and gets the stop signal on rank 1 alone: both ranks stop after the same step at a
checkpoint; a third resumes from that one and must end as the first (same data position, same
optimizer state, same loss curve).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from helpers import free_port, wait_for_logged_step

from stratopt_ds import data, train

pytestmark = __import__("pytest").mark.dist  # the deepspeed launcher, 2 CPU ranks
ROOT = Path(__file__).resolve().parent.parent


def launch(out: Path, store: Path, *extra: str, stop_rank: int | None = None,
           at_step: int = 0) -> subprocess.CompletedProcess:
    """The 2-rank job; ``stop_rank``: send that rank the stop signal once step ``at_step`` is logged."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           "--module", "stratopt_ds.train", "--deepspeed_config", str(ROOT / "ds_configs" / "tiny_zero2_cpu.json"),
           "--steps", "20", "--batch-size", "16", "--out", str(out), "--no-progress", "--eval-batches", "2",
           "--save-every", "10", "--data", str(store), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if stop_rank is not None:
        wait_for_logged_step(out, at_step, proc)
        rank = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                    if p.environ().get("RANK") == str(stop_rank))
        rank.send_signal(signal.SIGUSR2)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # e.g. the ranks disagree on stopping: one waits forever
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            p.kill()
        stdout, stderr = proc.communicate()
    expected = 0 if stop_rank is None else train.EXIT_STOPPED  # the launcher passes the rank's on
    assert proc.returncode == expected, stdout[-3000:] + stderr[-3000:]
    # DeepSpeed's CPU all-reduce buffers of this job are gone (release_cpu_comm_shm)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_deepspeed_launcher_trains_stratopt_from_the_config_and_resumes(tmp_path):
    store = data.build_store("synthetic", tmp_path / "store", data.BuildSettings(val_tokens=10_000),
                             progress=False)
    out = tmp_path / "run"
    launch(out, store.path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["optimizer"] == "stratopt" and summary["status"] == "ok"
    losses = summary["losses"]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for s in steps if "loss" in s) == 20  # rank 0 alone writes the log
    assert len(steps[0]["layer_norms"]) == len(summary["layers"])
    assert 0 < summary["norm_allreduce_share"] < 1 and summary["norm_allreduce_time"] > 0
    assert (out / "tensorboard").is_dir()
    assert summary["store"] == str(store.path) and summary["data_state"]["store"] == store.fingerprint

    # resume a copy from its step-10 checkpoint, as if killed between step 10 and step 20
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "summary.json").unlink()
    (resumed / "checkpoints" / "latest").write_text("step_10\n")
    metrics = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("".join(  # what a run killed after step 10 logged
        line + "\n" for line in metrics if json.loads(line)["step"] <= 10))
    proc = launch(resumed, store.path, "--resume", stop_rank=1, at_step=13)
    assert "at step 10" in proc.stdout
    stopped_at = int((resumed / "checkpoints" / "latest").read_text().strip()[5:])
    assert 13 <= stopped_at < 20 and f"stopped after step {stopped_at} on SIGUSR2" in proc.stdout
    assert not (resumed / "summary.json").exists()
    proc = launch(resumed, store.path, "--resume")
    assert f"at step {stopped_at}" in proc.stdout
    again = json.loads((resumed / "summary.json").read_text())
    assert again["resumed_from"] == stopped_at
    assert again["losses"] == losses  # steps 11-20 bit-identical on the same 2 ranks
    assert again["val_losses"] == summary["val_losses"]
    assert again["data_state"] == summary["data_state"]


def run_launch(out: Path, *args: str, config: str = "tiny_zero2_cpu.json",
               ranks: int = 2) -> tuple[subprocess.CompletedProcess, int]:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
           "--module", "stratopt_ds.train", "--deepspeed_config", config, "--batch-size", "16",
           "--out", str(out), "--no-progress", "--no-tensorboard", "--data", "synthetic",
           "--max-docs", "300", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, port


def test_a_run_deepspeed_skips_is_reported_diverged_and_autotp_trains_the_unsplit_model(tmp_path):
    """DeepSpeed skips overflowing steps before our optimizer sees them: they still count as
    skipped steps, so --diverge-after stops the run (exit 3, status diverged).

    Tensor parallelism: the tiny LLaMA under AutoTP (2 ranks, TP2, ZeRO-1: q/k/v/o, the MLP
    and the vocabulary-parallel head split by DeepSpeed along HF's tp_plan, the RMSNorm weights
    and the embedding whole on both ranks) logs the per-layer norms and losses of the same run
    on 1 rank; the TP pair reads the same micro-batches. AutoTP with ZeRO-3 is refused on every
    rank before any process group."""
    proc, port = run_launch(tmp_path / "diverged", "--steps", "40", "--lr", "1e30",
                            "--diverge-after", "5", "--eval-batches", "1",
                            config=str(ROOT / "ds_configs" / "tiny_zero2_cpu.json"))
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "diverged" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps_done"] < 40
    assert summary["skipped_steps"] >= 5
    records = [json.loads(line) for line in (tmp_path / "diverged" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-5:]
    assert all(r["grad_norm"] is None for r in last)  # no stale norm of an older step
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))

    config = json.loads((ROOT / "ds_configs" / "tiny_zero2_cpu.json").read_text())
    config["zero_optimization"]["stage"] = 1
    (tmp_path / "one.json").write_text(json.dumps(config))
    config["tensor_parallel"] = {"autotp_size": 2}
    (tmp_path / "tp.json").write_text(json.dumps(config))
    logs = {}
    for name, ranks in (("one", 1), ("tp", 2)):
        proc, _ = run_launch(tmp_path / name, "--steps", "6", "--eval-batches", "1",
                             config=str(tmp_path / f"{name}.json"), ranks=ranks)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert ("2 rank(s) (tensor parallel 2)" in proc.stdout) is (name == "tp")
        logs[name] = [r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                      if "loss" in r]
    assert len(logs["tp"]) == len(logs["one"]) == 6
    for one, tp in zip(logs["one"], logs["tp"]):
        assert abs(tp["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"]), (one["step"], tp["loss"], one["loss"])
        assert len(tp["layer_norms"]) == len(one["layer_norms"])
        worst = max(abs(a - b) / abs(b) for a, b in zip(tp["layer_norms"], one["layer_norms"]))
        assert worst <= 1e-5, (one["step"], worst)

    config["zero_optimization"]["stage"] = 3
    (tmp_path / "tp3.json").write_text(json.dumps(config))
    proc, _ = run_launch(tmp_path / "tp3", "--steps", "4", config=str(tmp_path / "tp3.json"))
    assert proc.returncode != 0
    assert proc.stderr.count("tensor_parallel.autotp_size=2 with zero_optimization.stage=3") == 2
    assert "Initializing TorchBackend" not in proc.stdout + proc.stderr  # no process group started
    assert not (tmp_path / "tp3").exists()  # nothing written
