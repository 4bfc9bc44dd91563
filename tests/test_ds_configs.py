"""The shipped DeepSpeed configs (ds_configs/*.json) load, build their optimizer, and validate."""
import copy
import re
from pathlib import Path

import pytest
import torch
import deepspeed.runtime.config as ds_config
from deepspeed.runtime.lr_schedules import WarmupCosineLR

import stratopt_ds
from stratopt_ds.deepspeed import load_config, prepare_config, resolve_optimizer_name

CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))
# The world size each config's train_batch_size is written for (ds_configs/README.md).
WORLD = {"tiny_zero2_cpu.json": 2, "7b_zero3_hpz.json": 32}  # hpZ: 4 nodes of 8 GPUs
DEFAULT_WORLD = 8


class FakeDist:
    """What DeepSpeedConfig asks of deepspeed.comm, without a process group."""

    def __init__(self, world):
        self.world = world

    def get_rank(self, group=None):
        return 0

    def get_world_size(self, group=None):
        return self.world


def validated(cfg, world, monkeypatch):
    monkeypatch.setattr(ds_config, "dist", FakeDist(world))
    return ds_config.DeepSpeedConfig(cfg)


def prepared(cfg):
    """What stratopt_ds.deepspeed.initialize hands to deepspeed.initialize."""
    section = cfg["optimizer"]
    optimizer = stratopt_ds.create_optimizer(resolve_optimizer_name(section["type"]),
                                             torch.nn.Linear(4, 4), **section["params"])
    cfg = copy.deepcopy(cfg)
    del cfg["optimizer"]
    return prepare_config(cfg, optimizer.layer_options["clip"]), optimizer


def test_every_preset_and_stage_is_shipped():
    names = {p.name for p in CONFIGS}
    for preset in ("134m", "500m", "1b"):
        for stage in ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"):
            assert f"{preset}_{stage}.json" in names
    assert {"tiny_zero2_cpu.json", "1b_zero2_la.json", "3b_zero3_offload.json",
            "7b_zero3_offload.json", "7b_zero3_hpz.json", "3b_autotp2_zero1.json",
            "7b_autotp4_zero1.json"} <= names
    assert (CONFIG_DIR / "README.md").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_ready_to_run(path, monkeypatch):
    cfg = load_config(str(path))
    assert '"auto"' not in path.read_text()  # every value concrete
    name = resolve_optimizer_name(cfg["optimizer"]["type"])
    assert name in stratopt_ds.available_optimizers()
    ready, optimizer = prepared(cfg)

    # Never both clippings by accident: an optimizer that clips itself leaves the engine's off.
    clips = optimizer.layer_options["clip"] != "none"
    assert ready["gradient_clipping"] == (0.0 if clips else cfg["gradient_clipping"])
    assert cfg.get("gradient_clipping", 0.0) == 0.0 or not clips
    assert ready["gradient_clipping"] > 0 or clips  # and one that does not clip gets the engine's

    # Stage, tensor parallelism, offload and precision are what the file name says.
    m = re.match(r"(tiny|134m|500m|1b|3b|7b)_(?:autotp(\d)_)?zero(\d)(_offload)?(_hpz)?", path.name)
    tp, stage, offload, hpz = int(m[2] or 1), int(m[3]), m[4], m[5]
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    assert zero.get("offload_optimizer", {}).get("device", "none") == ("cpu" if offload else "none")
    assert zero.get("zero_hpz_partition_size", 1) == (8 if hpz else 1)  # hpZ within a node of 8
    assert cfg.get("tensor_parallel", {}).get("autotp_size", 1) == tp
    assert cfg["bf16"]["enabled"] is (m[1] != "tiny") and "fp16" not in cfg
    if offload:
        assert ready["zero_force_ds_cpu_optimizer"] is False
    assert ready["zero_allow_untested_optimizer"] is True

    # Batch arithmetic, checked by DeepSpeed itself for the world size the config is written for
    # (split over the data-parallel ranks: a tensor-parallel group shares its micro-batches).
    data_world = WORLD.get(path.name, DEFAULT_WORLD) // tp
    micro, accum = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    assert cfg["train_batch_size"] == micro * accum * data_world
    ds = validated(ready, data_world, monkeypatch)
    assert (ds.world_size, ds.zero_optimization_stage) == (data_world, stage)
    assert ds.train_batch_size == cfg["train_batch_size"] and ds.scheduler_name == "WarmupCosineLR"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_schedule_warms_up_then_decays_to_a_tenth(path):
    cfg = load_config(str(path))
    sched = cfg["scheduler"]
    assert sched["type"] == "WarmupCosineLR"
    params = sched["params"]
    assert params["cos_min_ratio"] == 0.1
    assert 0 < params["warmup_num_steps"] < params["total_num_steps"]
    _, optimizer = prepared(cfg)
    peak = cfg["optimizer"]["params"]["lr"]
    scheduler = WarmupCosineLR(optimizer, **params)  # DeepSpeed's own parameter names
    scheduler.step(0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(params["warmup_min_ratio"] * peak)
    scheduler.step(params["warmup_num_steps"])  # the first decay step, a hair below the peak
    assert optimizer.param_groups[0]["lr"] == pytest.approx(peak, rel=0.02)
    scheduler.step(params["total_num_steps"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * peak)


def test_deepspeed_rejects_a_config_launched_on_the_wrong_world_size(monkeypatch):
    ready, _ = prepared(load_config(str(CONFIG_DIR / "1b_zero2.json")))
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        validated(ready, 4, monkeypatch)
