"""The run policy: one clipping rule, the same outcome from every entry point.

Each entry point gets the same requests (an optimizer's clip mode x the engine's global clip
setting) through its own front door: the ``stratopt-train`` argument check, ``stratopt_ds.
deepspeed.initialize`` (up to the call into DeepSpeed), the HF ``StratTrainingArguments``, the
accelerate plugin, and a study plan. A refused request is refused by all of them, naming both
settings; an accepted one gives the engine the same global clip everywhere (the study only
checks, so it contributes the verdict alone).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

import stratopt_ds
import stratopt_ds.deepspeed  # noqa: F401  (the alias module: stratopt_ds.deepspeed.initialize)
from stratopt_ds import run_policy, train
from stratopt_ds.integrations.accelerate import deepspeed_plugin
from stratopt_ds.study.plan import parse_plan

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = json.loads((ROOT / "ds_configs" / "tiny_zero2_cpu.json").read_text())
REFUSED = "conflicting clipping"


def _config(tmp_path, clip, engine_clip, with_optimizer=True) -> tuple[dict, Path]:
    config = copy.deepcopy(SHIPPED)
    config.pop("gradient_clipping")
    if engine_clip is not None:
        config["gradient_clipping"] = engine_clip
    if with_optimizer:
        config["optimizer"]["params"]["clip"] = clip
    else:
        config.pop("optimizer")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return config, path


def via_train(tmp_path, clip, engine_clip, capsys):
    _, path = _config(tmp_path, clip, engine_clip)
    try:
        with mock.patch.dict(os.environ, {"WORLD_SIZE": "2"}):  # as the launcher sets it
            run = train.resolve_args(["--deepspeed_config", str(path), "--data", "synthetic",
                                      "--steps", "2", "--batch-size", "16", "--preset", "tiny"])
    except SystemExit:
        return "refused", capsys.readouterr().err
    return run.prepared.deepspeed["gradient_clipping"], ""


def via_deepspeed_initialize(tmp_path, clip, engine_clip, capsys, monkeypatch):
    import deepspeed

    seen = {}

    def fake_initialize(**kwargs):  # the call into DeepSpeed: record what it would get
        seen.update(kwargs["config"])
        raise RuntimeError("stop before DeepSpeed")

    monkeypatch.setattr(deepspeed, "initialize", fake_initialize)
    config, _ = _config(tmp_path, clip, engine_clip)
    config["optimizer"]["type"] = "stratopt"
    try:
        stratopt_ds.deepspeed.initialize(model=torch.nn.Linear(3, 3), config=config)
    except ValueError as e:
        return "refused", str(e)
    except RuntimeError as e:
        assert "stop before DeepSpeed" in str(e)
    return seen["gradient_clipping"], ""


def via_hf(tmp_path, clip, engine_clip, capsys):
    from stratopt_ds.integrations.hf import StratTrainingArguments

    config = json.loads((ROOT / "ds_configs" / "hf" / "zero2.json").read_text())
    config.pop("gradient_clipping", None)
    if engine_clip is not None:
        config["gradient_clipping"] = engine_clip
    try:
        args = StratTrainingArguments(output_dir=str(tmp_path), report_to="none", deepspeed=config,
                                      optim="stratopt", optim_args=f"clip={clip}")
    except ValueError as e:
        return "refused", str(e)
    return args.max_grad_norm, ""


def via_accelerate(tmp_path, clip, engine_clip, capsys):
    config, _ = _config(tmp_path, clip, engine_clip, with_optimizer=False)
    optimizer = stratopt_ds.create_optimizer("stratopt", torch.nn.Linear(3, 3), clip=clip)
    try:
        plugin = deepspeed_plugin(config, optimizer)
    except ValueError as e:
        return "refused", str(e)
    return plugin.deepspeed_config["gradient_clipping"], ""


def via_study(tmp_path, clip, engine_clip, capsys):
    _, path = _config(tmp_path, clip, engine_clip)
    raw = yaml.safe_load((ROOT / "stratopt_ds" / "study" / "plans" / "ci_tiny.yaml").read_text())
    raw["sizes"]["tiny"]["deepspeed"] = {"config": str(path), "num_gpus": 2}
    raw["sizes"]["tiny"]["batch_size"] = 16  # the config's train_batch_size on 2 GPUs
    raw["arms"] = [{"name": "ours", "optimizer": "stratopt", "opt_args": {"clip": clip}}]
    raw["baseline"] = "ours"
    try:
        parse_plan(raw)
    except ValueError as e:
        return "refused", str(e)
    return "accepted", ""


ENTRY_POINTS = {"stratopt-train": via_train, "deepspeed.initialize": via_deepspeed_initialize,
                "hf": via_hf, "accelerate": via_accelerate, "study": via_study}

# (optimizer clip mode, the engine's global clip as configured) -> the engine's clip, or refused
CASES = [
    ("layer", 1.0, "refused"),
    ("global", 0.3, "refused"),
    ("layer", None, 0.0),   # silent config: the default 1.0 is turned off for a self-clipping optimizer
    ("layer", 0.0, 0.0),
    ("none", None, 1.0),    # DeepSpeed's default
    ("none", 0.5, 0.5),
]


@pytest.mark.parametrize("clip,engine_clip,expected", CASES, ids=[f"{c}-{e}" for c, e, _ in CASES])
def test_every_entry_point_applies_the_one_clipping_rule(tmp_path, capsys, monkeypatch, clip, engine_clip,
                                                         expected):
    outcomes = {}
    for name, entry in ENTRY_POINTS.items():
        kwargs = {"monkeypatch": monkeypatch} if entry is via_deepspeed_initialize else {}
        where = tmp_path / name.replace(".", "_")
        where.mkdir()
        outcomes[name] = entry(where, clip, engine_clip, capsys, **kwargs)
    for name, (value, message) in outcomes.items():
        if expected == "refused":
            assert value == "refused", f"{name} accepted clip={clip} with a global clip {engine_clip}"
            assert REFUSED in message and f"clip={clip!r}" in message, (name, message)
        elif name == "study":
            assert value == "accepted", (name, message)
        else:
            assert value == expected, (name, value, message)


def test_the_rule_itself():
    assert run_policy.engine_clipping("auto", "layer")[0] == 0.0
    with pytest.raises(run_policy.PolicyError, match=r"gradient_clipping=-1: expected a number >= 0"):
        run_policy.engine_clipping(-1, "none")
    with pytest.raises(run_policy.PolicyError, match="set the learning rate with --lr"):
        run_policy.refuse_lr_in_args({"lr": 1.0}, "--opt-args", "--lr")
    assert run_policy.check_optimizer("la-sqrt-b1depth-cliplayer", {}) == "layer"
    with pytest.raises(run_policy.PolicyError, match="unknown optimizer 'nope'"):
        run_policy.check_optimizer("nope", {})
    with pytest.raises(ValueError, match=r"invalid clip='sometimes'"):
        run_policy.check_optimizer("stratopt", {"clip": "sometimes"})


# ------------------------------------------------------------------------------------------------
# run_policy.prepare: the one function every entry point calls


def _request(**kwargs) -> run_policy.RunRequest:
    return run_policy.RunRequest(**kwargs)


def test_prepare_resolves_the_optimizer_from_request_section_or_default():
    config = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2,
              "optimizer": {"type": "StratOpt", "params": {"lr": 2e-3, "beta3": 0.99, "eps": "auto"}}}
    prepared = run_policy.prepare(_request(deepspeed=config, steps=40, default_lr=1e-3))
    assert prepared.optimizer == "stratopt" and prepared.lr == 2e-3  # the section's lr
    assert prepared.hyperparams == {"beta3": 0.99, "lr": 2e-3, "t_alpha": 40, "t_beta3": 40}
    assert "optimizer" not in prepared.deepspeed and "optimizer" in config  # a prepared copy
    assert prepared.deepspeed["zero_allow_untested_optimizer"] is True
    assert prepared.deepspeed["gradient_clipping"] == 0.0 and prepared.clip_mode == "layer"
    assert prepared.notes and "gradient_clipping in --deepspeed_config is set to 0" in prepared.notes[0]
    # the request's lr wins over the section's; the request's keywords over its params
    prepared = run_policy.prepare(_request(deepspeed=config, lr=5e-4, opt_args={"beta3": 0.9}))
    assert prepared.lr == 5e-4 and prepared.hyperparams["beta3"] == 0.9
    # no section, no name: stratopt with the default lr; no engine: no engine clip, no note
    prepared = run_policy.prepare(_request(default_lr=1e-3))
    assert (prepared.optimizer, prepared.lr, prepared.engine_clip, prepared.notes) == \
        ("stratopt", 1e-3, 0.0, [])


@pytest.mark.parametrize("request_kwargs, words", [
    (dict(optimizer="adamw", deepspeed={"optimizer": {"type": "StratOpt"}}),
     ["--optimizer 'adamw' conflicts", "optimizer.type 'StratOpt'"]),
    (dict(deepspeed={"optimizer": {"type": "Adam"}}),
     ["optimizer.type 'Adam' is not a stratopt_ds optimizer", "available"]),
    (dict(opt_args={"lr": 0.1}), ["--opt-args", "--lr"]),
    (dict(opt_args={"beta3": 2.0}), ["--opt-args", "beta3"]),
    (dict(lr=float("nan")), ["--lr", "finite number > 0", "nan"]),
    (dict(deepspeed={"gradient_accumulation_steps": 0}, batch_size=8),
     ["gradient_accumulation_steps=0", "integer >= 1"]),
    (dict(deepspeed={"gradient_accumulation_steps": 3}, batch_size=8, ranks=2),
     ["--batch-size 8", "2 x 3"]),
    (dict(deepspeed={"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                     "zero_force_ds_cpu_optimizer": True}),
     ["zero_force_ds_cpu_optimizer=true", "DeepSpeedCPUAdam"]),
])
def test_prepare_refuses_naming_the_setting(request_kwargs, words):
    with pytest.raises(run_policy.PolicyError) as err:
        run_policy.prepare(_request(**request_kwargs))
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_prepare_words_its_messages_in_the_callers_terms():
    names = run_policy.Settings(opt_args="--optim_args", lr="--learning_rate", batch="batch_size")
    with pytest.raises(run_policy.PolicyError, match="--optim_args: set the learning rate with --learning_rate"):
        run_policy.prepare(_request(opt_args={"lr": 1.0}, names=names))
    with pytest.raises(run_policy.PolicyError, match="batch_size 5 is not divisible"):
        run_policy.prepare(_request(deepspeed={}, batch_size=5, ranks=2, names=names))


def test_prepare_takes_an_optimizer_instance_as_it_is():
    model = torch.nn.Linear(3, 3)
    ours = stratopt_ds.create_optimizer("stratopt", model, clip="global")
    prepared = run_policy.prepare(_request(optimizer=ours, deepspeed={"zero_optimization": {
        "stage": 1, "offload_optimizer": {"device": "cpu"}}}))
    assert prepared.optimizer is None and prepared.hyperparams == {} and prepared.clip_mode == "global"
    assert prepared.deepspeed["zero_force_ds_cpu_optimizer"] is False
    foreign = torch.optim.SGD(model.parameters(), lr=0.1)
    prepared = run_policy.prepare(_request(optimizer=foreign, deepspeed={}))
    assert prepared.clip_mode == "none" and prepared.engine_clip == 1.0  # DeepSpeed's default
