"""Tests never touch the network: '--data auto' resolves to the synthetic corpus. Stores built
from sources and trained tokenizers go to a cache of the session's own (subprocesses inherit
it), never to the user's ~/.cache."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
