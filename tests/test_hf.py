"""HF Trainer integration: stratopt_ds.integrations.hf and examples/hf_train.py.

In-process: ``--optim`` / ``--optim_args`` parsing, the DeepSpeed config preparation and every
trap that is decided before training. One launch on 2 CPU ranks (gloo) of tests/dist/hf_worker.py
runs the other cases: ZeRO-3, exact per-layer norms, offload, ``optimizers=``, and the shipped
script (its ``__main__``) with a shipped config.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import OptimizerNames

import stratopt_ds
from stratopt_ds import models
from stratopt_ds.integrations import hf
from stratopt_ds.integrations.hf import StratTrainer, StratTrainingArguments, parse_optim_args
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
HF_CONFIGS = ROOT / "ds_configs" / "hf"


def parse(tmp_path, *argv: str) -> StratTrainingArguments:
    parser = HfArgumentParser(StratTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--report_to", "none", *argv])
    return args


def hf_config(**extra) -> dict:
    config = json.loads((HF_CONFIGS / "zero2.json").read_text())
    config.update(extra)
    return config


def ds_args(tmp_path, config, **kw) -> StratTrainingArguments:
    return StratTrainingArguments(output_dir=str(tmp_path), report_to="none", deepspeed=config, **kw)


# ------------------------------------------------------------------------------------------------
# --optim and --optim_args


@pytest.mark.parametrize("name", stratopt_ds.available_optimizers())
def test_optim_accepts_every_stratopt_name(tmp_path, name):
    args = parse(tmp_path, "--optim", name)
    assert args.optim == name and type(args.optim) is str and args.uses_stratopt
    assert args.to_dict()["optim"] == name


def test_optim_keeps_transformers_names(tmp_path):
    args = parse(tmp_path, "--optim", "adamw_torch")
    assert args.optim == OptimizerNames.ADAMW_TORCH and not args.uses_stratopt
    assert args.max_grad_norm == 1.0  # the Trainer's default for an optimizer that does not clip


def test_optim_defaults_to_stratopt(tmp_path):
    assert parse(tmp_path).optim == "stratopt"


def test_bad_optim_name_is_refused_with_the_names(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(tmp_path, "--optim", "stratop")
    err = capsys.readouterr().err
    assert "invalid choice: 'stratop'" in err
    assert "'stratopt'" in err and "'la-sqrt-b1depth-cliplayer'" in err and "'adamw_torch'" in err
    with pytest.raises(ValueError, match=r"--optim 'stratop' is not an optimizer name; available: "
                                         r"stratopt_ds: adamw, ademamix, stratopt, .*; transformers: "):
        StratTrainingArguments(output_dir=str(tmp_path), optim="stratop")


def test_plain_training_arguments_still_refuse_our_names(tmp_path):
    with pytest.raises(ValueError, match="stratopt is not a valid OptimizerNames"):
        TrainingArguments(output_dir=str(tmp_path), optim="stratopt")


def test_optim_args_values_are_json_typed():
    assert parse_optim_args("mix_alpha=8,clip=global,betas=[0.9,0.95],t_alpha=100,norm_beta=0.9") == {
        "mix_alpha": 8, "clip": "global", "betas": [0.9, 0.95], "t_alpha": 100, "norm_beta": 0.9}
    assert parse_optim_args('{"clip": "layer", "betas": [0.9, 0.99]}') == {"clip": "layer", "betas": [0.9, 0.99]}
    assert parse_optim_args(' clip_tau = 3 , granularity="block" ') == {"clip_tau": 3, "granularity": "block"}
    assert parse_optim_args(None) == {} and parse_optim_args("") == {}
    with pytest.raises(ValueError, match=r"--optim_args 'clip_tau': expected key=value or a JSON object"):
        parse_optim_args("clip_tau")


@pytest.mark.parametrize("optim_args, message", [
    ("lr=0.1", "set the learning rate with --learning_rate"),
    ("momentum=0.9", "unknown hyperparameter 'momentum'; allowed: lr, betas"),
    ("clip=sometimes", "invalid clip='sometimes': expected one of 'none', 'global', 'layer'"),
    ("betas=[0.9,1.5]", r"invalid betas\[1\]=1.5"),
])
def test_bad_optim_args_fail_at_parse_time(tmp_path, optim_args, message):
    with pytest.raises(ValueError, match=message):
        parse(tmp_path, "--optim", "stratopt", "--optim_args", optim_args)


def test_version_guard(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.check_transformers("5.23.0")  # the tested major: silent
    with pytest.warns(UserWarning, match=r"tested with transformers 5.x, this is 6.0.0"):
        hf.check_transformers("6.0.0")
    monkeypatch.setattr(hf, "HF_NAMES", tuple(n for n in hf.HF_NAMES if n != "adamw_torch"))
    with pytest.raises(ImportError, match=r"cannot work with transformers 5.99.0: no OptimizerNames "
                                          r"value 'adamw_torch'"):
        hf.check_transformers("5.99.0")


# ------------------------------------------------------------------------------------------------
# The optimizer the Trainer builds (single process)


def tiny_trainer(args) -> StratTrainer:
    return StratTrainer(model=models.build_model("tiny", seq_len=16), args=args)


def test_trainer_builds_ours_with_its_decay_groups_names_and_args(tmp_path):
    args = parse(tmp_path, "--optim", "stratopt", "--learning_rate", "2e-3", "--adam_beta2", "0.95",
                 "--weight_decay", "0.05", "--max_steps", "40", "--optim_args", "clip_tau=3,eps=1e-6")
    trainer = tiny_trainer(args)
    opt = trainer.create_optimizer()
    assert type(opt).__name__ == "StratOpt" and opt is trainer.built_optimizer
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # transformers' rule: norm weights (and biases) do not decay; the names come along
    assert set(no_decay["param_names"]) == {n for n, _ in trainer.model.named_parameters() if "norm" in n}
    assert "model.layers.1.mlp.down_proj.weight" in decay["param_names"]
    assert len(decay["params"]) == len(decay["param_names"])
    assert decay["lr"] == 2e-3 and decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-6
    assert opt.layer_options["clip_tau"] == 3 and opt.layer_options["clip"] == "layer"
    assert decay["t_alpha"] == decay["t_beta3"] == 40  # the slow momentum warms up over the run
    assert args.max_grad_norm == 0.0  # the optimizer clips itself: the Trainer's clip is off


def test_trainer_draws_store_windows_in_the_data_paths_epoch_order(tmp_path):
    """A WindowDataset gets the seeded per-index order (data_seed), not RandomSampler's
    torch.randperm of every window; other datasets keep the Trainer's own sampler."""
    from stratopt_ds import data

    store = data.build_store("synthetic", tmp_path / "store", data.BuildSettings(max_docs=200, val_tokens=100),
                             progress=False)
    windows = data.Windows(store.part("train"), 16)
    args = parse(tmp_path, "--optim", "stratopt", "--data_seed", "7", "--per_device_train_batch_size", "4")
    trainer = StratTrainer(model=models.build_model("tiny", 257, 17), args=args,
                           train_dataset=data.WindowDataset(windows))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, data.WindowSampler) and list(sampler) == list(data.WindowSampler(len(windows), 7))
    first = next(iter(trainer.get_train_dataloader()))["input_ids"]
    assert torch.equal(first, windows.read(list(sampler)[:4]))
    other = StratTrainer(model=models.build_model("tiny", 257, 17), args=args,
                         train_dataset=[{"input_ids": torch.zeros(17, dtype=torch.long)}] * 8)
    assert not isinstance(other._get_train_sampler(), data.WindowSampler)


def test_trainer_keeps_names_for_our_class_in_optimizer_cls_and_kwargs(tmp_path):
    trainer = StratTrainer(model=models.build_model("tiny", seq_len=16), args=parse(tmp_path, "--weight_decay", "0.1"),
                           optimizer_cls_and_kwargs=(stratopt_ds.LASqrtB1DepthClipLayer,
                                                     {"lr": 1e-3, "granularity": "block"}))
    opt = trainer.create_optimizer()
    assert type(opt) is stratopt_ds.LASqrtB1DepthClipLayer
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.layer_map.layout.layer_names == ["model.embed_tokens.weight", "block.0", "block.1",
                                                "lm_head.weight", "model.norm.weight"]


def test_trainer_delegates_transformers_names(tmp_path):
    opt = tiny_trainer(parse(tmp_path, "--optim", "adamw_torch")).create_optimizer()
    assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 2


def test_trainer_refuses_plain_training_arguments(tmp_path):
    with pytest.raises(TypeError, match="StratTrainer needs StratTrainingArguments"):
        StratTrainer(model=models.build_model("tiny", seq_len=16),
                     args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))


# ------------------------------------------------------------------------------------------------
# The DeepSpeed config (traps 2 and 3, clipping), decided before any rank trains


def test_config_section_naming_another_optimizer_is_refused(tmp_path):  # trap 2
    config = hf_config(optimizer={"type": "AdamW", "params": {"lr": "auto"}})
    with pytest.raises(ValueError, match=r'--deepspeed: optimizer.type \'AdamW\' is not a stratopt_ds '
                                         r'optimizer.*flat parameter list.*Remove the "optimizer" key'):
        ds_args(tmp_path, config)


def test_config_section_naming_ours_is_translated(tmp_path):  # trap 2, handled
    section = {"type": "LASqrtB1DepthClipLayer",
               "params": {"lr": "auto", "weight_decay": 0.1, "clip_tau": 3.0, "granularity": "block"}}
    args = ds_args(tmp_path, hf_config(optimizer=section), weight_decay=0.1)
    assert args.optim == "la-sqrt-b1depth-cliplayer"  # from the section: --optim left out
    assert "optimizer" not in args.deepspeed and "optimizer" not in args.hf_deepspeed_config.config
    hp = hf.trainer_hyperparams(args)
    assert hp["clip_tau"] == 3.0 and hp["granularity"] == "block" and hp["lr"] == args.learning_rate


def test_config_section_disagreeing_with_the_trainer_is_refused(tmp_path):
    config = json.loads((ROOT / "ds_configs" / "tiny_zero2_cpu.json").read_text())
    with pytest.raises(ValueError, match=r"optimizer.params.lr=0.003 vs --learning_rate=5e-05\n"
                                         r"  optimizer.params.weight_decay=0.1 vs --weight_decay=0.0"):
        ds_args(tmp_path, config)
    with pytest.raises(ValueError, match=r"optimizer.params.clip_tau=2.0 vs --optim_args clip_tau=4"):
        ds_args(tmp_path, config, learning_rate=0.003, weight_decay=0.1, optim_args="clip_tau=4")
    with pytest.raises(ValueError, match=r"--optim 'adamw' conflicts with the DeepSpeed config's "
                                         r"optimizer.type 'StratOpt'"):
        ds_args(tmp_path, config, optim="adamw", learning_rate=0.003, weight_decay=0.1)


def test_offload_config_keeps_our_optimizer(tmp_path):  # trap 3
    args = ds_args(tmp_path, str(HF_CONFIGS / "zero2_offload.json"))
    for config in (args.deepspeed, args.hf_deepspeed_config.config):  # what the plugin gets
        assert config["zero_force_ds_cpu_optimizer"] is False
        assert config["zero_allow_untested_optimizer"] is True
    forced = json.loads((HF_CONFIGS / "zero2_offload.json").read_text())
    forced["zero_force_ds_cpu_optimizer"] = True
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer=true would replace"):
        ds_args(tmp_path, forced)


def test_gradient_clipping_is_explicit(tmp_path):
    args = ds_args(tmp_path, hf_config())  # "auto" clipping, an optimizer that clips itself
    assert args.max_grad_norm == 0.0 and args.hf_deepspeed_config.config["gradient_clipping"] == 0.0
    args = ds_args(tmp_path, hf_config(), optim="stratopt-noclip")
    assert args.max_grad_norm == 1.0 and args.hf_deepspeed_config.config["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match=r"conflicting clipping: --max_grad_norm=0.5 .* clip='layer'"):
        ds_args(tmp_path, hf_config(), max_grad_norm=0.5)  # the run policy's one rule
    args = ds_args(tmp_path, hf_config(), optim="stratopt-noclip", max_grad_norm=0.5)
    assert args.hf_deepspeed_config.config["gradient_clipping"] == 0.5
    with pytest.raises(ValueError, match=r"--max_grad_norm 0.5 disagrees with the DeepSpeed config's "
                                         r"gradient_clipping=0.0"):
        ds_args(tmp_path, hf_config(gradient_clipping=0.0), max_grad_norm=0.5)


# ------------------------------------------------------------------------------------------------
# Real runs: 2 CPU ranks under the deepspeed launcher


def run(cmd, out: Path, timeout: int = 600) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        pytest.fail(f"{' '.join(map(str, cmd))} failed (rc={proc.returncode}):\n{tail}")


def decreases(losses, by: float) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - by


def assert_ours_with_two_groups(summary, name="StratOpt"):
    assert summary["inner_optimizer"] == name
    assert summary["groups"] == [{"weight_decay": 0.1, "num_names": 16}, {"weight_decay": 0.0, "num_names": 5}]
    assert summary["bound"] and summary["world_size"] == 2


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "report.json"
    run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
         str(ROOT / "tests" / "dist" / "hf_worker.py"), "--out", str(out)], out)
    report = json.loads(out.read_text())
    crashed = {name: r["crash"] for name, r in report.items() if "crash" in r}
    assert not crashed, "\n".join(f"{name}:\n{tb}" for name, tb in crashed.items())
    return report


@pytest.mark.dist
def test_script_trains_on_the_shipped_zero2_config(worker):
    """`deepspeed examples/hf_train.py --deepspeed ds_configs/tiny_zero2_cpu.json --optim stratopt ...`,
    as docs/DEEPSPEED_HF_ACCELERATE.md has it; the config's StratOpt section is translated (trap 2, handled)."""
    summary = worker["script_cli"]
    assert summary["optim"] == "stratopt" and summary["zero_stage"] == 2
    assert_ours_with_two_groups(summary)
    assert summary["gradient_clipping"] == 0.0
    assert len(summary["losses"]) == 10 and decreases(summary["losses"], 1.0), summary["losses"]


@pytest.mark.dist
def test_zero3_script_run_trains_ours(worker):
    r = worker["zero3"]
    assert r["optim"] == "stratopt" and r["zero_stage"] == 3
    assert_ours_with_two_groups(r)
    assert len(r["losses"]) == 12 and decreases(r["losses"], 1.0), r["losses"]


@pytest.mark.parametrize("case", ["zero3", "zero2_block", "zero2_offload"])
@pytest.mark.dist
def test_layer_norms_exact_across_partitions(worker, case):
    """The Trainer's engine, one more step: per-layer norms equal a single-process reference."""
    r = worker[case]
    assert r["bound"] and r["norms_same_on_ranks"]
    assert r["norm_rel_err"] < 1e-5, r["norm_rel_err"]


@pytest.mark.dist
def test_block_layers_come_from_the_parameter_names(worker):
    r = worker["zero2_block"]
    assert r["optim"] == "la-sqrt-b1depth-cliplayer" and r["zero_stage"] == 2
    assert_ours_with_two_groups(r, "LASqrtB1DepthClipLayer")
    # a block's weights (decay group) and norm weights (no-decay group) form one layer
    assert r["layer_names"] == ["model.embed_tokens.weight", "block.0", "block.1", "lm_head.weight",
                                "model.norm.weight"]


@pytest.mark.dist
def test_offload_keeps_our_optimizer_in_the_trainer(worker):  # trap 3, handled
    r = worker["zero2_offload"]
    assert r["optim"] == "stratopt" and r["zero_stage"] == 2
    assert_ours_with_two_groups(r)


@pytest.mark.dist
def test_optimizers_passed_to_the_trainer_are_honoured(worker):  # trap 1, handled
    r = worker["client_optimizer"]
    assert r["inner_is_client"] and r["inner_optimizer"] == "StratOptNoMix" and r["groups"] == 2
    assert r["scheduler_is_client"] and r["lrs"] == [1e-3, 1e-3]  # 2e-3 x the LambdaLR's 0.5
    assert r["steps"] == 3 and r["bound"]


@pytest.mark.dist
def test_scheduler_passed_next_to_a_deepspeed_scheduler_is_refused(worker):  # trap 1, refused half
    assert worker["scheduler_conflict"]["error"] == (
        'ValueError: a scheduler was passed in optimizers=(optimizer, scheduler) and the DeepSpeed '
        'config has a "scheduler" section (the Trainer would drop the one passed); remove one of them')


@pytest.mark.parametrize("source,hub", [("fineweb", False), ("auto", True)])
def test_hf_script_refuses_network_data(source, hub, monkeypatch, capsys):
    """examples/hf_train.py reads local data only: 'fineweb', and 'auto' where the hub answers
    (it would resolve to FineWeb), stop at parse time with a usage error naming --data."""
    import importlib.util

    from stratopt_ds import data

    spec = importlib.util.spec_from_file_location("hf_train", ROOT / "examples" / "hf_train.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "hf_train", script)  # its dataclasses look themselves up there
    spec.loader.exec_module(script)
    monkeypatch.setattr(data.sources, "hub_reachable", lambda timeout=3.0: hub)
    with pytest.raises(SystemExit) as exc:
        script.parse(["--data", source, "--output_dir", "unused"])
    assert exc.value.code == 2 and f"--data {source} streams FineWeb" in capsys.readouterr().err
    monkeypatch.setattr(data.sources, "hub_reachable", lambda timeout=3.0: False)
    margs, _ = script.parse(["--data", "auto", "--output_dir", "unused"])  # offline: synthetic, accepted
    assert margs.data == "auto"
