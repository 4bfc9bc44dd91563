"""Study runs as slurm jobs, submitted through submitit.

Each run is one job: ``nodes_per_run`` nodes, one task per node. Every task (a submitit
:class:`TrainJob`) starts its node's ranks with the DeepSpeed launcher, the rendezvous on the
first node of the allocation, the same way ``launch/multi_node_no_ssh.sh`` does for
``launch/slurm.sbatch`` (``--no_ssh`` with a hostfile of placeholder names that only counts the
nodes; node K gets global ranks K*G..K*G+G-1). A run without a DeepSpeed config on one node is
a plain ``python -m stratopt_ds.train``. What runs is the run's ``train_config.json``, exactly as
the local executor runs it, so both give the same losses.

Requeue: a job resumes from its newest checkpoint whenever it (re)starts, so a job that slurm
requeues (``scontrol requeue``, preemption) goes on where its last checkpoint left it. On the
time-limit warning (``--signal=USR2@<signal_delay_s>``, what submitit asks for) the ranks save a
checkpoint of the step they are in first (:mod:`stratopt_ds.preemption`): slurm signals every
process of the job, the launchers ignore the signal, the ranks agree on it and exit with code 75,
and :meth:`TrainJob.checkpoint` waits for that before submitit requeues the job.

The job ids live in ``<run>/slurm.json``; ``study status`` and ``study cancel`` read them, and a
new ``study run`` never submits a run whose job is still pending or running.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from ..preemption import EXIT_STOPPED, signal_of

JOB_FILE = "slurm.json"
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD")


@dataclass
class SlurmOptions:
    """What each run's job asks slurm for (``study run --executor slurm``, or a plan's ``slurm:``)."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: int = 24 * 60                 # the job's time limit
    nodes_per_run: int = 1
    gpus_per_node: int = 0                  # GPUs (ranks) per node; 0: CPU nodes
    ranks_per_node: Optional[int] = None    # default: gpus_per_node, else 1
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    max_running: int = 64                   # jobs of this study running at once (a dependency chain limit)
    signal_delay_s: int = 120               # the time-limit warning: checkpoint and requeue
    max_timeouts: int = 10                  # requeues on reaching the time limit, then the run fails
    extra: list[str] = field(default_factory=list)   # more sbatch options, "--key=value"

    # lower bounds of the integer options (None: slurm's default)
    BOUNDS = {"time_min": 1, "nodes_per_run": 1, "gpus_per_node": 0, "ranks_per_node": 1,
              "cpus_per_task": 1, "max_running": 1, "signal_delay_s": 0, "max_timeouts": 0}

    def __post_init__(self) -> None:
        """Every bound, before anything is written or submitted; the message names the option
        as the command line and a plan's ``slurm:`` section spell it."""
        from .plan import PlanError

        def bad(name: str, rule: str) -> PlanError:
            value = getattr(self, name)
            return PlanError(f"slurm option --{name.replace('_', '-')} (plan: slurm.{name}) must "
                             f"be {rule}, got {value!r}")

        for name, low in self.BOUNDS.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise bad(name, f"an integer >= {low}")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise bad("mem_gb", "> 0")
        if self.signal_delay_s >= 60 * self.time_min:
            raise bad("signal_delay_s", f"shorter than the time limit ({60 * self.time_min} s)")

    @property
    def ranks(self) -> int:
        return self.ranks_per_node or self.gpus_per_node or 1

    def submitit_parameters(self) -> dict[str, Any]:
        extra = {}
        for item in self.extra:
            key, _, value = item.lstrip("-").partition("=")
            extra[key] = value if value else True
        params = {"slurm_partition": self.partition, "slurm_account": self.account,
                  "slurm_qos": self.qos, "timeout_min": self.time_min, "nodes": self.nodes_per_run,
                  "tasks_per_node": 1, "cpus_per_task": self.cpus_per_task,
                  "gpus_per_node": self.gpus_per_node or None, "mem_gb": self.mem_gb,
                  "slurm_signal_delay_s": self.signal_delay_s,
                  "slurm_additional_parameters": extra or None}
        return {k: v for k, v in params.items() if v is not None}


class TrainJob:
    """Runs on every task of a run's job (one task per node); submitit pickles it."""

    stop_wait_s: float = 100  # class defaults: a job pickled by an earlier version lacks them
    _child: Optional[subprocess.Popen] = None

    def __init__(self, ranks_per_node: int, stop_wait_s: float = 100):
        self.ranks_per_node = ranks_per_node
        self.stop_wait_s = stop_wait_s  # how long the warning handler waits for the checkpoint
        self._child: Optional[subprocess.Popen] = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_child": None}

    def __call__(self, config_path: str, run_dir: str, deepspeed: bool) -> int:
        import submitit

        from ..resume import has_checkpoint

        env = submitit.JobEnvironment()
        train = ["--config", config_path, "--stop-signal", stop_signal().name]
        if has_checkpoint(Path(run_dir) / "checkpoints"):
            train.append("--resume")
        if not deepspeed and env.num_nodes == 1 and self.ranks_per_node == 1:
            return self._run([sys.executable, "-m", "stratopt_ds.train", *train])
        # one port per job (jobs may share a node); SLURM_JOB_ID is unique per array task too
        port = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)
        with tempfile.NamedTemporaryFile("w", prefix="stratopt-hosts.", suffix=".txt") as hosts:
            hosts.write("".join(f"node{i} slots={self.ranks_per_node}\n" for i in range(env.num_nodes)))
            hosts.flush()
            return self._run([deepspeed_launcher(), "--hostfile", hosts.name, "--no_ssh",
                              "--node_rank", str(env.node), "--num_nodes", str(env.num_nodes),
                              "--num_gpus", str(self.ranks_per_node),
                              "--master_addr", node_address(env.hostnames[0]), "--master_port", port,
                              "--module", "stratopt_ds.train", *train])

    def _run(self, command: list[str]) -> int:
        """``command`` with the stop signal ignored: the launchers (deepspeed's runner and
        launch.py) keep ignoring it and the ranks, which inherit that, catch it themselves."""
        sig = stop_signal()
        self._child = subprocess.Popen(command, preexec_fn=lambda: signal.signal(sig, signal.SIG_IGN))
        rc = self._child.wait()
        if rc not in (0, EXIT_STOPPED):  # a failed run fails its job: slurm records FAILED
            raise RuntimeError(f"{' '.join(command)} exited with {rc}")
        return rc  # 75: stopped at a checkpoint; the job is requeued (or the study resumes it)

    def checkpoint(self, config_path: str, run_dir: str, deepspeed: bool):
        """The time-limit warning, on the job's first task, in submitit's signal handler: pass
        the signal on to the ranks (slurm signals them too; once more does no harm), wait for
        them to save their checkpoint and exit, then let submitit requeue the job; the next
        start resumes from that checkpoint. A run that ended meanwhile (finished: its
        summary.json is there; or failed) is not requeued: None, and submitit ends the job."""
        import submitit

        code = self._stop_child() if self._child is not None else None
        finished = (Path(run_dir) / "summary.json").is_file()
        if finished or code not in (None, EXIT_STOPPED):
            return None
        return submitit.helpers.DelayedSubmission(TrainJob(self.ranks_per_node, self.stop_wait_s),
                                                  config_path, run_dir, deepspeed)

    def _stop_child(self) -> Optional[int]:
        """Send the stop signal to the child and its descendants; its exit code once it has
        exited (within ``stop_wait_s``), None when it is still running or was reaped already."""
        import psutil

        try:
            tree = [psutil.Process(self._child.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return self._child.returncode
        for proc in tree:
            try:
                proc.send_signal(stop_signal())
            except psutil.NoSuchProcess:
                pass
        # Not Popen.wait: the interrupted wait in __call__ holds its lock. waitpid reaps the
        # child here; that wait then finds it gone (and submitit exits the task anyway).
        deadline = time.monotonic() + self.stop_wait_s
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(self._child.pid, os.WNOHANG)
            except ChildProcessError:
                return self._child.returncode
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.2)
        return None


def stop_signal() -> signal.Signals:
    """The warning signal submitit asks slurm for (``SUBMITIT_PREEMPT_SIGNAL``, default USR2)."""
    return signal_of(os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def node_address(node: str) -> str:
    """The address of slurm node ``node`` (its NodeAddr): node names need not resolve."""
    proc = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True)
    for item in proc.stdout.split():
        if item.startswith("NodeAddr="):
            return item.split("=", 1)[1] or node
    return node


def deepspeed_launcher() -> str:
    return shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"


def submit(options: SlurmOptions, name: str, runs: list[tuple[str, Path, Path, bool]]) -> list[str]:
    """Submit runs ``(key, train_config.json, run directory, deepspeed?)`` as one job array of at
    most ``max_running`` tasks at once; record each job id in its run directory; return them."""
    import submitit

    folder = runs[0][2].parents[2] / "slurm" / "%j"  # <study>/slurm/<array>_<task>
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=options.max_timeouts)
    executor.update_parameters(name=f"stratopt:{name}", slurm_array_parallelism=options.max_running,
                               **options.submitit_parameters())
    job = TrainJob(options.ranks, stop_wait_s=max(10, options.signal_delay_s - 20))
    jobs = executor.map_array(job, [str(c) for _, c, _, _ in runs],
                              [str(d) for _, _, d, _ in runs], [ds for *_, ds in runs])
    for (key, _, run_dir, _), job in zip(runs, jobs):
        record = read_record(run_dir) or {"jobs": []}
        record["jobs"].append(job.job_id)
        record["options"] = asdict(options)
        record["log"] = str(job.paths.stderr)  # the run's stderr: its errors and tracebacks
        record["stdout"] = str(job.paths.stdout)  # submitit's start and end of every attempt
        (run_dir / JOB_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return [job.job_id for job in jobs]


def read_record(run_dir: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((Path(run_dir) / JOB_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def last_job(run_dir: Path) -> Optional[str]:
    record = read_record(run_dir)
    return record["jobs"][-1] if record and record.get("jobs") else None


def job_states() -> dict[str, dict[str, str]]:
    """Every job slurm holds, by id (an array task also as ``<array>_<task>``): one
    ``scontrol show job`` for a whole poll, however many runs the study has."""
    proc = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True)
    states = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        fields = {}
        for item in line.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        states[fields.get("JobId", "")] = fields
        for task in array_tasks(fields.get("ArrayTaskId", "N/A")):
            states[f"{fields['ArrayJobId']}_{task}"] = fields
    return states


def array_tasks(spec: str) -> list[int]:
    """``ArrayTaskId`` as task numbers: ``3``, or the pending rest of an array (``0-3%64``, ``1,4``)."""
    if spec in ("N/A", ""):
        return []
    tasks = []
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            tasks += range(int(lo), int(hi if hi.isdigit() else lo) + 1)
    return tasks


def job_state(job_id: str, states: Optional[dict[str, dict[str, str]]] = None) -> dict[str, str]:
    """``JobState``, ``Reason``, ``ExitCode`` (and the rest) as ``scontrol show job`` gives them
    (from ``states`` of :func:`job_states` when given); ``{"JobState": "UNKNOWN"}`` once slurm
    has forgotten the job (after MinJobAge)."""
    states = job_states() if states is None else states
    return states.get(str(job_id), {"JobState": "UNKNOWN"})


def is_active(job_id: Optional[str], states: Optional[dict[str, dict[str, str]]] = None) -> bool:
    return job_id is not None and job_state(job_id, states)["JobState"] in ACTIVE


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=False)


SUBMITIT_LINE = re.compile(r"^submitit \w+ \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[,.]\d+\) - (.*)$")


def attempt_seconds(stdout: Path, last_end: Optional[str] = None) -> list[float]:
    """Wall seconds of every attempt of a job (its first start and each requeue), on its first
    task, from submitit's log lines in ``stdout``: from "Starting with" to the attempt's last
    submitit line. Queue time is not in them. An attempt killed before it logged its end (the
    time limit, a node failure) counts 0, unless it is the last and ``last_end`` (slurm's
    ``EndTime``, the same local clock) says when it ended."""
    try:
        lines = Path(stdout).read_text(errors="replace").splitlines()
    except OSError:
        return []
    spans: list[list[datetime]] = []
    for line in lines:
        match = SUBMITIT_LINE.match(line)
        if not match:
            continue
        when = datetime.fromisoformat(match.group(1))
        if match.group(2).startswith("Starting with"):
            spans.append([when, when])
        elif spans:
            spans[-1][1] = when
    if spans and spans[-1][0] == spans[-1][1] and last_end:
        try:
            spans[-1][1] = max(spans[-1][0], datetime.fromisoformat(last_end))
        except ValueError:
            pass
    return [(end - start).total_seconds() for start, end in spans]


def slurm_available() -> Optional[str]:
    """None when sbatch, scontrol and scancel are on PATH; else what is missing."""
    missing = [tool for tool in ("sbatch", "scontrol", "scancel") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH: run on a slurm login node"
    if importlib.util.find_spec("submitit") is None:
        return "submitit is not installed: pip install 'stratopt-ds[study]'"
    return None
