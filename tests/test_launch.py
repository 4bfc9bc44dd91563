"""launch/: the scripts parse, refuse bad settings clearly, pass the right launcher arguments, and
train; 2 simulated nodes x 2 ranks reach the very same weights as 1 node x 4 ranks.

The multi-node case runs two separate launches of launch/multi_node_no_ssh.sh on this machine
(NODE_RANK 0 and 1, rendezvous on 127.0.0.1): the same global ranks, the same world size and so
the same partitions and the same gloo reduction order as one node of 4 ranks, hence bit-equal
weights (torch.equal, no tolerance). Slurm and pdsh are simulated by stand-in commands that only
record what they were asked to run.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import free_ports

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]
# tiny preset, fp32, ZeRO-2, StratOpt (ds_configs/tiny_zero2_cpu.json, the scripts' default)
TRAIN = ["--data", "synthetic", "--steps", "10", "--batch-size", "16", "--seq-len", "32",
         "--eval-batches", "0", "--no-progress", "--no-tensorboard"]
# what the launch scripts read: cleared so that the caller's environment cannot leak in
LAUNCH_ENV = ("NODE_RANK", "NUM_NODES", "GPUS_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "HOSTFILE",
              "NUM_GPUS", "DS_CONFIG", "DS_LAUNCHER_ARGS", "LAUNCHER", "DEEPSPEED", "RANKS")


def env(**extra) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return {**base, "OMP_NUM_THREADS": "1", "DEEPSPEED": str(Path(sys.executable).parent / "deepspeed"),
            **{k: str(v) for k, v in extra.items()}}


def run(cmd, cwd, timeout=60, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env(**extra), capture_output=True,
                          text=True, timeout=timeout)


def start(cmd, log: Path, cwd, **extra) -> subprocess.Popen:
    """A launch in its own process group, so that a hung one can be ended with all its ranks."""
    with open(log, "w") as fh:
        return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env(**extra), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes; once one launch fails (or time runs out) the others would wait in the
    rendezvous for a long time, so their process groups are ended (SIGTERM lets the scripts
    remove their temporary hostfiles; SIGKILL after 10 s)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, sig)
                try:
                    for p in procs:
                        p.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    pass
            break
        time.sleep(0.5)
    return [p.wait() for p in procs]


def tail(path: Path, n: int = 3000) -> str:
    return f"--- {path.name}:\n{path.read_text()[-n:]}"


def stand_ins(tmp_path: Path) -> Path:
    """bin/ with a recording `deepspeed`, `srun` and `scontrol` for a 2-node Slurm job, and
    do-nothing `pdsh` and `mpirun` (the hostfile script checks that they exist)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        # prints its arguments, and the hostfile it was given (a temporary file, gone afterwards)
        "deepspeed": 'echo "node=${NODE_RANK:-none} deepspeed $*"\n'
                     'echo "ignored: $(awk \'/^SigIgn/ {print $2}\' /proc/$$/status)"\nprev=\n'
                     'for a in "$@"; do\n'
                     '  [[ $prev == --hostfile ]] && sed "s/^/hostfile: /" "$a"; prev=$a\ndone',
        "scontrol": '[[ "$1 $2 $3" == "show hostnames gpu[07-08]" ]] && printf "gpu07\\ngpu08\\n"',
        # one task per node, one after the other, each with its own SLURM_NODEID
        "srun": 'while [[ $1 == -* ]]; do shift; done\n'
                'for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@" || exit; done',
        "pdsh": "exit 0",
        "mpirun": "exit 0",
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body + "\n")
        path.chmod(0o755)
    return bin_dir


def test_scripts_are_valid_bash():
    assert len(SCRIPTS) >= 5
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
        if script.name != "_common.sh":  # sourced, never run: its callers set the shell options
            assert "set -euo pipefail" in script.read_text(), script.name
            assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.mark.parametrize("script, extra, message", [
    ("multi_node_no_ssh.sh", {"NUM_NODES": 2}, "set NODE_RANK"),
    ("multi_node_no_ssh.sh", {"NUM_NODES": 2, "NODE_RANK": 2}, "0..1, got '2'"),
    ("multi_node_no_ssh.sh", {"NUM_NODES": 2, "NODE_RANK": 1, "GPUS_PER_NODE": 2}, "set MASTER_ADDR"),
    ("multi_node_no_ssh.sh", {"NUM_NODES": 2, "NODE_RANK": 1, "GPUS_PER_NODE": "x"},
     "GPUS_PER_NODE must be a positive integer"),
    ("single_node.sh", {"MASTER_PORT": 80}, "MASTER_PORT must be a TCP port"),
    ("multi_node_hostfile.sh", {}, "name a hostfile"),
    ("scaling_test.sh", {"HOSTFILE": "hosts", "GPUS_PER_NODE": 2, "LAUNCHER": "openmpi"},
     "a HOSTFILE sweep needs LAUNCHER=pdsh (got 'openmpi')"),
    ("scaling_test.sh", {"BATCH": 6},
     "BATCH=6 is not divisible by ranks x gradient_accumulation_steps = 2 x 2"),
])
def test_bad_settings_stop_with_a_clear_message(tmp_path, script, extra, message):
    proc = run([LAUNCH / script], tmp_path, **extra)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_slurm_template_runs_one_no_ssh_launch_per_node(tmp_path):
    bin_dir = stand_ins(tmp_path)
    proc = run(["bash", LAUNCH / "slurm.sbatch", "--steps", "5", "--out", "runs/x y"], tmp_path,
               PATH=f"{bin_dir}:{os.environ['PATH']}", DEEPSPEED=bin_dir / "deepspeed",
               SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES=2,
               SLURM_GPUS_ON_NODE=4, MASTER_PORT=29555)
    assert proc.returncode == 0, proc.stderr
    calls = [line for line in proc.stdout.splitlines() if " deepspeed " in line]
    assert len(calls) == 2, proc.stdout
    for rank, call in enumerate(calls):
        assert call.startswith(f"node={rank} deepspeed --hostfile ")
        assert (f"--no_ssh --node_rank {rank} --num_nodes 2 --num_gpus 4 --master_addr gpu07 "
                f"--master_port 29555 --module stratopt_ds.train --deepspeed_config "
                f"{ROOT}/ds_configs/tiny_zero2_cpu.json --steps 5 --out runs/x y") in call
    # the generated hostfile: only the node count and slots matter under --no_ssh
    assert proc.stdout.count("hostfile: node0 slots=4\nhostfile: node1 slots=4\n") == 2
    # the launcher ignores the stop signal (slurm's warning), which its ranks catch themselves
    ignored = [int(line.split()[1], 16) for line in proc.stdout.splitlines()
               if line.startswith("ignored: ")]
    assert len(ignored) == 2 and all(mask >> (signal.SIGUSR2 - 1) & 1 for mask in ignored)


def test_hostfile_script_passes_launcher_and_limits(tmp_path):
    bin_dir = stand_ins(tmp_path)
    hostfile = LAUNCH / "hostfile.example"
    proc = run([LAUNCH / "multi_node_hostfile.sh", hostfile, "--steps", "5"], tmp_path,
               PATH=f"{bin_dir}:{os.environ['PATH']}", DEEPSPEED=bin_dir / "deepspeed",
               NUM_NODES=1, GPUS_PER_NODE=4, MASTER_ADDR="10.0.0.1")
    assert proc.returncode == 0, proc.stderr
    assert (f"deepspeed --hostfile {hostfile} --launcher pdsh --num_nodes 1 --num_gpus 4 "
            f"--master_port 29500 --master_addr 10.0.0.1 --module stratopt_ds.train") in proc.stdout
    proc = run([LAUNCH / "multi_node_hostfile.sh", hostfile], tmp_path, LAUNCHER="openmpi",
               NUM_NODES=1, PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert proc.returncode == 2 and "LAUNCHER=openmpi cannot use NUM_NODES" in proc.stderr


@pytest.mark.dist
def test_two_nodes_of_two_ranks_equal_one_node_of_four(tmp_path):
    """ZeRO-2, StratOpt, fp32: 10 steps, then the saved weights and optimizer partitions."""
    train = TRAIN + ["--save-every", "10"]
    one, two = tmp_path / "one_node", tmp_path / "two_nodes"
    port_one, port_two = free_ports(2)
    # All three launches at once: on 2 cores that is faster than one after the other.
    procs = [start([LAUNCH / "single_node.sh", "4", *train, "--out", one], tmp_path / "one.log",
                   tmp_path, MASTER_PORT=port_one)]
    procs += [start([LAUNCH / "multi_node_no_ssh.sh", *train, "--out", two], tmp_path / f"node{k}.log",
                    tmp_path, NODE_RANK=k, NUM_NODES=2, GPUS_PER_NODE=2, MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port_two)
              for k in (0, 1)]
    logs = [tmp_path / name for name in ("one.log", "node0.log", "node1.log")]
    rcs = wait_all(procs, timeout=300)
    assert rcs == [0, 0, 0], "\n".join(map(tail, logs))
    # two launches really made one job: node 1 started global ranks 2 and 3 of 4
    node1 = logs[2].read_text()
    assert "nnodes=2, num_local_procs=2, node_rank=1" in node1 and "dist_world_size=4" in node1

    summaries = [json.loads((d / "summary.json").read_text()) for d in (one, two)]
    assert [s["ranks"] for s in summaries] == [4, 4]
    assert summaries[0]["losses"] == summaries[1]["losses"]

    def load(run_dir: Path, name: str) -> dict:
        return torch.load(run_dir / "checkpoints" / "step_10" / name, map_location="cpu",
                          weights_only=False)

    a, b = (load(d, "mp_rank_00_model_states.pt") for d in (one, two))
    assert a["global_steps"] == b["global_steps"] == 10
    assert a["module"].keys() == b["module"].keys()
    different = [k for k in a["module"] if not torch.equal(a["module"][k], b["module"][k])]
    assert not different, f"weights differ: {different}"
    assert summaries[0]["losses"][-1] < summaries[0]["losses"][0] - 0.5  # it did train
    for rank in range(4):  # each rank's fp32 partition and optimizer state, bit for bit
        x, y = (load(d, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
                for d in (one, two))
        for key in ("single_partition_of_fp32_groups", "base_optimizer_state"):
            xs, ys = flat_tensors(x[key]), flat_tensors(y[key])
            assert xs and len(xs) == len(ys), (rank, key)
            assert all(torch.equal(p, q) for p, q in zip(xs, ys)), f"rank {rank}: {key} differs"


def flat_tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a nested state, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in flat_tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in flat_tensors(v)]
    return []


@pytest.mark.dist
def test_scaling_script_writes_the_table(tmp_path):
    out = tmp_path / "scaling"
    proc = run([LAUNCH / "scaling_test.sh", out, "--data", "synthetic"], tmp_path, timeout=240,
               RANKS="1 2", STEPS=3, BATCH=16, SEQ_LEN=32, MASTER_PORT=free_ports(1)[0])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(out / "scaling.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["ranks", "nodes", "tokens_per_s", "step_time_s",
                             "norm_allreduce_share", "speedup", "last_loss"]
    assert [(r["ranks"], r["nodes"]) for r in rows] == [("1", "1"), ("2", "1")]
    for r in rows:
        assert float(r["tokens_per_s"]) > 0 and float(r["step_time_s"]) > 0
        assert 0 <= float(r["norm_allreduce_share"]) < 1
    assert float(rows[0]["speedup"]) == 1.0
    md = (out / "scaling.md").read_text().splitlines()
    assert md[0].startswith("| ranks | nodes | tokens/s | step time (ms) | norm all-reduce share")
    assert len(md) == 4 and md[2].startswith("| 1 | 1 |") and md[3].startswith("| 2 | 1 |")
    assert (out / "1n_2r" / "summary.json").is_file()
