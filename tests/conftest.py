"""Tests never touch the network: '--data auto' resolves to the synthetic corpus. Stores built
from sources and trained tokenizers go to a cache of the session's own (subprocesses inherit
it), never to the user's ~/.cache."""
import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every process the suite starts (DeepSpeed launches, slurm jobs, JIT builds) finds this Python's
# tools first, its ninja among them: two ninja versions (the venv's 1.13, the system's 1.11) on
# one build directory rebuild each other's work, ~24 s for DeepSpeed's CPU comm op at each switch.
_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, os.environ.get("PATH", "")])
_CACHE = tempfile.mkdtemp(prefix="stratopt-test-cache-")
os.environ["STRATOPT_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHM = Path("/dev/shm")


def _cpu_comm_buffers() -> set[str]:
    return {p.name for p in SHM.glob("deepspeed_allreduce_buffer_*")} if SHM.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def no_leaked_deepspeed_shm():
    """Every DeepSpeed launch of the suite must leave no CPU all-reduce buffer in /dev/shm
    (66 MB per rank that would otherwise stay until reboot; see release_cpu_comm_shm)."""
    before = _cpu_comm_buffers()
    yield
    leaked = sorted(_cpu_comm_buffers() - before)
    assert not leaked, f"DeepSpeed shared-memory buffers left in /dev/shm: {leaked}"


@pytest.fixture(scope="session")
def cpu_op():
    """The native CPU op (JIT-built once per source hash); a test that needs it fails, never
    skips, when it does not build."""
    from stratopt_ds.ops import builder

    module = builder.load("cpu")
    if module is None:
        pytest.fail(f"the native CPU op did not build: {builder.why_unavailable('cpu')}")
    return module


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a real Slurm cluster on this machine (the "
                            "slurm_cluster fixture: root, slurm-wlm and munge); deselect with "
                            "-m 'not slurm'")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real two-node Slurm cluster on this machine, started once (tests/slurm_cluster.py).
    Skips where Slurm cannot run (not installed, not root); under CI=true it fails instead, since
    .ci/run installs Slurm and a skip would hide that the tests never ran."""
    from slurm_cluster import start_cluster

    cluster, why = start_cluster()
    if cluster is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Local study runs that several test files compare against (each trained once per session)

from helpers import DIVERGING_ARM, ROOT, edited_plan  # noqa: E402


@pytest.fixture(scope="session")
def ci_tiny_study(tmp_path_factory):
    """ci_tiny (2 arms x 2 seeds x 20 steps) plus the diverging arm, run here with 2 jobs and
    reported: the runner and report tests read it; the slurm executor's runs must equal it."""
    import json

    from stratopt_ds.study.report import write_report
    from stratopt_ds.study.runner import run_study

    base = tmp_path_factory.mktemp("study")
    plan = edited_plan(base / "plan.yaml", edit=lambda p: p["arms"].append(DIVERGING_ARM))
    out = base / "out"
    counts = run_study(plan, out, jobs=2, progress=False)
    md, js = write_report(out)
    return {"plan": plan, "out": out, "counts": counts, "md": md.read_text(),
            "report": json.loads(js.read_text())}


@pytest.fixture(scope="session")
def two_rank_study(tmp_path_factory):
    """One 30-step run of the tiny model under DeepSpeed (ZeRO-2, 2 ranks on this machine)
    through the local executor: what the two-node slurm runs (the study's --nodes-per-run 2,
    launch/slurm.sbatch given its train_config.json) must equal bit for bit."""
    import json

    from stratopt_ds.study.runner import run_study

    base = tmp_path_factory.mktemp("two_rank")
    sizes = {"tiny": {"preset": "tiny", "batch_size": 16,
                      "deepspeed": {"config": str(ROOT / "ds_configs" / "tiny_zero2_cpu.json"),
                                    "num_gpus": 2}}}
    plan = edited_plan(base / "two_nodes.yaml", name="two_nodes", seeds=[0], sizes=sizes,
                       baseline="stratopt", arms=[{"name": "stratopt", "optimizer": "stratopt",
                                                   "steps": 30, "save_every": 100}])
    out = base / "local"
    assert run_study(plan, out, progress=False)["ok"] == 1
    run_dir = out / "tiny" / "stratopt" / "seed0"
    return {"plan": plan, "run_dir": run_dir,
            "summary": json.loads((run_dir / "summary.json").read_text())}

