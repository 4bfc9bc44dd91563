"""A real Slurm cluster of two nodes on this machine, for the tests marked `slurm`.

munged, slurmctld and two slurmd (`slurmd -N n1`, `slurmd -N n2`, both at 127.0.0.1 on ports of
their own) run from a private slurm.conf in a temporary directory; nothing under /etc or /run is
used or changed (munged gets a key of its own and a private socket, slurm.conf names it). The
clients (sbatch, srun, squeue, scontrol, scancel, sinfo) reach this cluster only through the
environment of `SlurmCluster.env` (SLURM_CONF=<private slurm.conf>).

There is no accounting database (no slurmdbd): `sacct` does not work here. Job states come from
`scontrol show job`, which keeps finished jobs for MinJobAge (set to a day, so for the session).
Needs root (slurmd starts the job steps as the submitting user) and the Debian packages
`slurm-wlm` and `munge`.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from helpers import free_ports

# States after which a job does not run again (JobRequeue=1 makes NODE_FAIL jobs pending again,
# but a test sees that as the end of the attempt it waited for).
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
# daemons live in sbin, which a non-login PATH may lack
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol",
            "scancel")


def _die_with_parent() -> None:
    """In a daemon before exec: SIGTERM when pytest dies, even by SIGKILL or a timeout, so that
    no daemon outlives the session that started it (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why."""


def why_unavailable() -> str | None:
    missing = [p for p in PROGRAMS if shutil.which(p, path=SEARCH_PATH) is None]
    if missing:
        return (f"Slurm is not installed (no {', '.join(missing)}): "
                "apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        return "a Slurm cluster needs root (slurmd starts job steps as the submitting user)"
    return None


class SlurmCluster:
    """Two nodes n1, n2 (2 CPUs each) in partition `debug`; start() waits until both are idle."""

    partition = "debug"
    nodes = ("n1", "n2")
    cpus_per_node = 2

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self._procs: dict[str, subprocess.Popen] = {}
        # SLURM_* of an enclosing job (pytest itself run under Slurm) would steer the clients
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env = {**env, "SLURM_CONF": str(self.conf), "PATH": SEARCH_PATH}

    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "munge", *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True)
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        lines = [
            "ClusterName=stratopt-test",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd-%n.log'}",
            # no cgroups: a container's cgroup tree is often read-only or v1/v2-mixed
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",  # jobs share a node by CPUs: two 1-CPU jobs fit on one
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=2",
            "MinJobAge=86400",  # scontrol keeps finished jobs: the only job history without sacct
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",  # no multi-second scheduling delays
            "MessageTimeout=10",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "MailProg=/bin/true",
            # the nodes declare 2 CPUs whatever this machine has, and little memory
            "SlurmdParameters=config_overrides",
            *(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
              f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN"
              for n, port in zip(self.nodes, node_ports)),
            f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES "
            "MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        # munged wants a key readable only by its user
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "w")
        self._procs[name] = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent)
        log.close()

    def start(self, timeout: float = 60) -> None:
        self._write_conf()
        m = self.root / "munge"
        # -F: foreground, so the pid we hold is the daemon's; --force: munged refuses root otherwise
        files = [f"--{kind}-file={m / ('munged.' + kind)}" for kind in ("pid", "log", "seed")]
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={m / 'munge.socket'}",
                               f"--key-file={m / 'munge.key'}", *files])
        self._wait_for((m / "munge.socket").exists, 10, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_for(self._all_idle, timeout, "the nodes did not become idle")

    def _all_idle(self) -> bool:
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            # a daemon that exited (bad config, port taken) is reported at once, not at the timeout
            dead = {n: p.returncode for n, p in self._procs.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                raise SlurmUnavailable(f"{what} (exited: {dead})\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)

    def logs(self, n: int = 2000) -> str:
        """The end of every daemon log, for failure messages."""
        files = sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out"))
        files.append(self.root / "munge" / "munged.log")
        return "\n".join(f"--- {f.name}:\n{f.read_text(errors='replace')[-n:]}"
                         for f in files if f.is_file())

    def stop(self) -> None:
        """Cancel every job (their slurmstepd would outlive slurmd), then end exactly the daemons
        started here, by pid: SIGTERM, SIGKILL after 10 s."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run("scancel", f"--partition={self.partition}", check=False)
            deadline = time.monotonic() + 15
            while self.run("squeue", "-h", check=False).stdout and time.monotonic() < deadline:
                time.sleep(0.5)
        # slurmd first (they say goodbye to slurmctld), munged last (the others need it until then)
        order = [f"slurmd-{n}" for n in self.nodes] + ["slurmctld", "munged"]
        for name in order:
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # --- client helpers -------------------------------------------------------------------------

    def run(self, *cmd, check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        """A command (srun, scontrol, ...) against this cluster, output captured as text; check=True
        raises with its output when it fails. kwargs go to subprocess.run (cwd, env, ...)."""
        kwargs.setdefault("env", self.env)
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                              timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))}: exit {proc.returncode}\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args, cwd: Path | str | None = None, env: dict | None = None) -> str:
        """Submit (`sbatch --parsable ARGS`); the job id. env: extra variables for the job (sbatch
        exports its whole environment to the job)."""
        proc = self.run("sbatch", "--parsable", *args, cwd=cwd, env={**self.env, **(env or {})})
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(?:^|\s)([\w/:]+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 120) -> dict[str, str]:
        """Wait until the job has finished (see FINISHED); its record. Fails on timeout, after
        cancelling the job."""
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["JobState"] not in FINISHED:
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout} s\n"
                                     f"{self.logs()}")
            time.sleep(0.5)
        return info


def start_cluster() -> tuple[SlurmCluster | None, str | None]:
    """(a started cluster, None), or (None, why it cannot run)."""
    reason = why_unavailable()
    if reason:
        return None, reason
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="stratopt-slurm-")))
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)  # the message already has the logs
        return None, f"the Slurm cluster did not start: {exc}"
    return cluster, None
