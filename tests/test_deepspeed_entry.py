"""stratopt_ds.deepspeed: config preparation and errors (in-process; the launches are in test_zero)."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from stratopt_ds.deepspeed import initialize, load_config, prepare_config, resolve_optimizer_name
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def _zero(stage=2, offload=False, **extra):
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {"zero_optimization": zero, **extra}


def test_names_and_class_names_resolve():
    assert resolve_optimizer_name("stratopt") == "stratopt"
    assert resolve_optimizer_name("StratOpt") == "stratopt"
    assert resolve_optimizer_name("LASqrtB1DepthClipLayer") == "la-sqrt-b1depth-cliplayer"
    assert resolve_optimizer_name("AdamW") is None  # DeepSpeed's own names pass through


def test_self_clipping_optimizer_turns_engine_clipping_off_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = prepare_config(_zero(), "layer")
    assert cfg["gradient_clipping"] == 0.0
    assert "gradient_clipping" in caplog.text
    assert cfg["zero_allow_untested_optimizer"] is True


def test_non_clipping_optimizer_keeps_deepspeed_default_explicitly():
    assert prepare_config(_zero(), "none")["gradient_clipping"] == 1.0


def test_both_clippings_are_refused():
    """The run policy's one rule (tests/test_run_policy.py drives every entry point with it)."""
    with pytest.raises(ValueError, match=r"conflicting clipping: gradient_clipping=0.5 .* clip='layer'"):
        prepare_config(_zero(gradient_clipping=0.5), "layer")


def test_offload_keeps_our_optimizer():
    assert prepare_config(_zero(offload=True), "layer")["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer=true"):
        prepare_config(_zero(offload=True, zero_force_ds_cpu_optimizer=True), "layer")


def test_config_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read DeepSpeed config .*nope.json"):
        load_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="no DeepSpeed config"):
        load_config(None)


def test_unknown_stratopt_type_fails_before_deepspeed_starts():
    with pytest.raises(ValueError, match="unknown optimizer type 'stratopt-fast'.*la-sqrt"):
        initialize(model=object(), config={"optimizer": {"type": "stratopt-fast"}})


def test_bad_hyperparameter_in_json_is_named():
    import torch
    with pytest.raises(ValueError, match="clip_tau=-1"):
        initialize(model=torch.nn.Linear(2, 2),
                   config={"optimizer": {"type": "StratOpt", "params": {"clip_tau": -1}}})


def test_model_parallel_unit_is_refused_before_deepspeed_starts_and_a_pipeline_is_not(monkeypatch):
    """An mpu: the norm all-reduce would miss the tensor-parallel ranks. A PipelineModule goes
    through to DeepSpeed (the binding numbers its layers over every stage)."""
    import deepspeed
    import torch

    def no_initialize(**kwargs):
        raise AssertionError("deepspeed.initialize was reached")

    monkeypatch.setattr(deepspeed, "initialize", no_initialize)
    config = {"optimizer": {"type": "StratOpt"}, "zero_optimization": {"stage": 1}}
    with pytest.raises(ValueError, match="mpu=object .*tensor or sequence parallelism"):
        initialize(model=torch.nn.Linear(2, 2), config=config, mpu=object())
    from deepspeed.pipe import PipelineModule  # a subclass, as users write them (no process group here)

    class Stages(PipelineModule):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.lin = torch.nn.Linear(2, 2)

    with pytest.raises(AssertionError, match="deepspeed.initialize was reached"):
        initialize(model=Stages(), config=config)
    with pytest.raises(ValueError, match="PipelineModule with zero_optimization.stage=0 .*no ZeRO "
                                         "wrapper.*use zero_optimization.stage=1"):
        initialize(model=Stages(), config={**config, "zero_optimization": {"stage": 0}})
    with pytest.raises(ValueError, match="PipelineModule with zero_optimization.stage=2 .*engine runs "
                                         "ZeRO stage 0 or 1; use zero_optimization.stage=1"):
        initialize(model=Stages(), config={**config, "zero_optimization": {"stage": 2}})


def test_release_cpu_comm_shm_unlinks_this_ranks_buffer():
    """In a 1-rank gloo group: the buffer name DeepSpeed's CPU all-reduce would leave behind is
    unlinked (a stand-in file at that path), and nothing happens without a process group."""
    script = r'''
import os, sys, torch.distributed as dist
from stratopt_ds.deepspeed import cpu_comm_shm_path, release_cpu_comm_shm
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
path = cpu_comm_shm_path(0)
path.write_bytes(b"x")
assert release_cpu_comm_shm() is None and path.exists()  # no process group yet: untouched
dist.init_process_group("gloo", rank=0, world_size=1)
assert release_cpu_comm_shm() == path and not path.exists()
assert release_cpu_comm_shm() is None  # idempotent
dist.destroy_process_group()
print("ok", path.name)
'''
    port = str(free_port())
    r = subprocess.run([sys.executable, "-c", script, port], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
    assert f"_127.0.0.1_{port}_0" in r.stdout
