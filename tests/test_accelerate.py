"""accelerate + DeepSpeed with a stratopt_ds optimizer: stratopt_ds.integrations.accelerate, examples/accelerate_train.py.

In-process: the plugin's config (offload flag, clipping, the ``"optimizer"`` section) and the
check after ``prepare``. Launched: ``accelerate launch`` on 2 CPU ranks, ZeRO-2 with optimizer
offload, where accelerate would otherwise swap our optimizer for DeepSpeedCPUAdam.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import DeepSpeedPlugin
from deepspeed import DeepSpeedEngine

import stratopt_ds
from stratopt_ds.integrations.accelerate import bind_prepared, deepspeed_plugin, distributed_state
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
OFFLOAD = ROOT / "ds_configs" / "hf" / "zero2_offload.json"
SHIPPED = ROOT / "ds_configs" / "tiny_zero2_cpu.json"


def model():
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))


def test_plugin_keeps_our_optimizer_under_offload():  # trap 3
    plugin = deepspeed_plugin(str(OFFLOAD), stratopt_ds.create_optimizer("stratopt", model()))
    config = plugin.deepspeed_config
    assert config["zero_force_ds_cpu_optimizer"] is False and config["zero_allow_untested_optimizer"] is True
    assert config["gradient_clipping"] == 0.0  # "auto" made explicit: StratOpt clips itself
    noclip = deepspeed_plugin(str(OFFLOAD), stratopt_ds.create_optimizer("stratopt-noclip", model()))
    assert noclip.deepspeed_config["gradient_clipping"] == 1.0


def test_plugin_refuses_a_config_forcing_deepspeeds_cpu_adam():
    config = json.loads(OFFLOAD.read_text())
    config["zero_force_ds_cpu_optimizer"] = True
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer=true would replace"):
        deepspeed_plugin(config, stratopt_ds.create_optimizer("stratopt", model()))


def test_plugin_prepares_an_existing_plugin_in_place():  # e.g. the one `accelerate launch` made
    plugin = DeepSpeedPlugin(hf_ds_config=json.loads(OFFLOAD.read_text()))
    assert "zero_force_ds_cpu_optimizer" not in plugin.deepspeed_config
    assert deepspeed_plugin(plugin, stratopt_ds.create_optimizer("stratopt", model())) is plugin
    assert plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] is False


def test_plugin_removes_a_section_describing_the_optimizer_passed():
    section = json.loads(SHIPPED.read_text())["optimizer"]
    opt = stratopt_ds.create_optimizer("stratopt", model(), **section["params"])
    plugin = deepspeed_plugin(str(SHIPPED), opt)
    assert "optimizer" not in plugin.deepspeed_config
    assert plugin.deepspeed_config["scheduler"]["type"] == "WarmupCosineLR"  # the rest is kept


@pytest.mark.parametrize("section, optimizer, message", [
    ({"type": "AdamW", "params": {"lr": 1e-3}}, "stratopt",
     r'optimizer.type \'AdamW\' is not a stratopt_ds optimizer.*Remove the "optimizer" key'),
    ({"type": "StratOpt", "params": {"lr": 3e-3}}, "la-sqrt-b1depth-cliplayer",
     r"optimizer.type 'StratOpt' is not the optimizer passed \(LASqrtB1DepthClipLayer"),
    ({"type": "StratOpt", "params": {"lr": 0.5, "clip_tau": 2.0, "mix_alpha": "auto"}}, "stratopt",
     r"disagrees with the optimizer passed \(it would be silently ignored\):\n"
     r"  optimizer.params.lr=0.5 vs the optimizer's lr=0.0003\n"),
    ({"type": "StratOpt", "params": {"momentum": 0.9}}, "stratopt",
     r"optimizer.params has unknown hyperparameters \['momentum'\]"),
])
def test_plugin_refuses_a_conflicting_optimizer_section(section, optimizer, message):  # trap 2
    config = {**json.loads(OFFLOAD.read_text()), "optimizer": section}
    with pytest.raises(ValueError, match=message):
        deepspeed_plugin(config, stratopt_ds.create_optimizer(optimizer, model()))


def test_bind_prepared_detects_a_swapped_optimizer():
    """What accelerate leaves when the offload flag is missing: an engine stepping another optimizer."""
    net = model()
    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)  # only the attributes bind_prepared reads
    torch.nn.Module.__init__(engine)
    engine.basic_optimizer = torch.optim.AdamW(net.parameters())
    engine.config = json.loads(OFFLOAD.read_text())
    with pytest.raises(RuntimeError, match=r"DeepSpeed steps AdamW, not the stratopt_ds optimizer passed.*"
                                           r'unless "zero_force_ds_cpu_optimizer" is false'):
        bind_prepared(engine, stratopt_ds.create_optimizer("stratopt", net))
    with pytest.raises(TypeError, match="expected the DeepSpeed engine returned by accelerator.prepare"):
        bind_prepared(net)


def test_distributed_state_is_a_no_op_outside_a_launcher(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed_state() is False


@pytest.mark.dist
def test_accelerate_launch_trains_ours_at_zero2_with_offload(tmp_path):
    port = free_port()
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
           "--use_deepspeed", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "examples/accelerate_train.py", "--config", str(OFFLOAD), "--steps", "15", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    # the ranks' own lines (e.g. why one aborted) come before the launcher's traceback: keep many
    assert proc.returncode == 0, (proc.stdout[-3000:] + "\n---- stderr ----\n"
                                  + "\n".join(proc.stderr.splitlines()[-200:]))
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["zero_stage"] == 2 and s["offload"] is True
    assert s["inner_optimizer"] == "StratOpt" and s["inner_is_ours"], s  # not DeepSpeedCPUAdam
    # create_optimizer(model): decay on the 16 matrices, none on the 5 norm weights, with names
    assert s["groups"] == [{"weight_decay": 0.1, "num_names": 16}, {"weight_decay": 0.0, "num_names": 5}]
    assert s["bound"] and s["gradient_clipping"] == 0.0
    losses = s["losses"]
    assert len(losses) == 15 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.8, losses
