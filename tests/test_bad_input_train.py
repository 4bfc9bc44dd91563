"""Bad input to the training entry: one clear message, exit code 2, nothing written.

Every case runs ``stratopt_ds.train.main(argv)`` in this process, as the ``deepspeed`` launcher
would start it on each rank (``WORLD_SIZE=2``), and must stop in the checks, before any process
group, data, model or file exists: the run's ``--out`` is never created, no DeepSpeed
shared-memory file appears, no process group is initialised. Grouped by surface: options,
``--config`` files, DeepSpeed config sections, output paths.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stratopt_ds import data, models, train

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = json.loads((ROOT / "ds_configs" / "tiny_zero2_cpu.json").read_text())


def refused(argv: list[str], words: list[str], tmp_path: Path, capsys, monkeypatch) -> None:
    """``main(argv + --out)`` exits 2 naming every word; nothing is written or started."""
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(data.DataRequest, "open", no_work)
    monkeypatch.setattr(data.request, "build_store", no_work)
    monkeypatch.setattr(models, "build_model", no_work)
    out = tmp_path / "out"
    shm_before = set(Path("/dev/shm").iterdir())
    with pytest.raises(SystemExit) as exc:
        train.main([*argv, "--out", str(out)] if "--out" not in argv else argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    for word in words:
        assert word in err, (word, err)
    assert err.strip().splitlines()[-1].startswith("stratopt-train: error: "), err  # one message
    assert not out.exists()
    assert set(Path("/dev/shm").iterdir()) <= shm_before
    assert not torch.distributed.is_initialized()


# ------------------------------------------------------------------------------------------------
# Options

OPTIONS = [
    (["--steps", "0"], ["--steps must be >= 1, got 0"]),
    (["--steps", "-3"], ["--steps must be >= 1"]),
    (["--steps", "ten"], ["--steps", "invalid int value: 'ten'"]),
    (["--batch-size", "0"], ["--batch-size must be >= 1"]),
    (["--seq-len", "0"], ["--seq-len must be >= 1"]),
    (["--lr", "0"], ["--lr must be a finite number > 0"]),
    (["--lr", "nan"], ["--lr must be a finite number > 0, got nan"]),
    (["--lr", "inf"], ["--lr must be a finite number > 0, got inf"]),
    (["--lr", "-1e-3"], ["--lr"]),
    (["--warmup-steps", "-1"], ["--warmup-steps must be >= 0"]),
    (["--max-docs", "0"], ["--max-docs must be >= 1"]),
    (["--bpe-vocab", "10"], ["--bpe-vocab must be >= "]),
    (["--seed", "-1"], ["--seed must be >= 0"]),
    (["--data-seed", "-2"], ["--data-seed must be >= 0"]),
    (["--val-windows", "0"], ["--val-windows must be >= 1"]),
    (["--eval-every", "-1"], ["--eval-every must be >= 0"]),
    (["--eval-batches", "-1"], ["--eval-batches must be >= 0"]),
    (["--save-every", "-5"], ["--save-every must be >= 0"]),
    (["--keep-checkpoints", "-1"], ["--keep-checkpoints must be >= 0"]),
    (["--diverge-after", "0"], ["--diverge-after must be >= 1"]),
    (["--optimizer", "adam"], ["--optimizer: unknown optimizer 'adam'", "stratopt", "adamw"]),
    (["--optimizer", "StratOpt"], ["--optimizer: unknown optimizer 'StratOpt'"]),
    (["--preset", "7B"], ["--preset", "'7B'", "134m"]),
    (["--device", "tpu:0"], ["--device"]),
    (["--device", "cuda"], ["--device cuda: CUDA is not available"]),
    (["--opt-args", "beta3=2"], ["--opt-args", "beta3"]),
    (["--opt-args", "clip=sometimes"], ["--opt-args", "clip", "'sometimes'"]),
    (["--opt-args", "nonsense=1"], ["--opt-args", "unknown hyperparameter 'nonsense'"]),
    (["--opt-args", "lr=0.1"], ["--opt-args: set the learning rate with --lr"]),
    (["--opt-args", "beta3"], ["--opt-args: expected key=value or a JSON object"]),
    (["--opt-args", "{bad json"], ["--opt-args"]),
    (["--opt-args", "eps=-1"], ["--opt-args", "eps"]),
    (["--opt-args", "betas=[0.9]"], ["--opt-args", "betas"]),
    (["--opt-args", "weight_decay=-0.1"], ["--opt-args", "weight_decay"]),
    (["--opt-args", "alpha_min=2", "alpha_max=1"], ["--opt-args", "alpha_min"]),
    (["--opt-args", "capturable=yes"], ["capturable='yes'", "True or False"]),
    (["--resume"], ["no complete checkpoint"]),
    (["--unknown-flag"], ["unrecognized arguments: --unknown-flag"]),
    (["--data", "/no/such/file.txt"], ["--data /no/such/file.txt", "not found"]),
    (["--data", "fineweb", "--max-docs", "2", "--tokenizer", "no-such-org/no-such-tok"], ["--tokenizer"]),
]


@pytest.mark.parametrize("argv, words", OPTIONS, ids=[" ".join(a)[:40] for a, _ in OPTIONS])
def test_bad_option(argv, words, tmp_path, capsys, monkeypatch):
    refused(["--data", "synthetic", *argv] if "--data" not in argv else argv, words, tmp_path,
            capsys, monkeypatch)


def test_resume_and_save_every_need_out(capsys, monkeypatch, tmp_path):
    for argv in (["--resume"], ["--save-every", "5"]):
        with pytest.raises(SystemExit) as exc:
            train.main(["--data", "synthetic", *argv])
        assert exc.value.code == 2 and "need --out" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# --config files

CONFIG_FILES = [
    ("steps: 0\n", [".steps: expected an integer >= 1, got 0"]),
    ("stepz: 3\n", ["unknown training option 'stepz'", "allowed:"]),
    ("steps: three\n", [".steps: expected an integer >= 1, got 'three'"]),
    ("lr: -1\n", [".lr: expected a finite number > 0"]),
    ("lr: .nan\n", [".lr: expected a finite number > 0"]),
    ("opt_args: [1, 2]\n", [".opt_args: expected a mapping"]),
    ("opt_args: {clip: sometimes}\n", ["--opt-args", "'sometimes'"]),
    ("tensorboard: maybe\n", [".tensorboard: expected true or false"]),
    ("- 1\n- 2\n", ["expected a mapping of training options"]),
    ("steps: [\n", ["not valid YAML or JSON"]),
    ("resume: true\n", ["no complete checkpoint"]),
    ("deepspeed_config: 3\n", [".deepspeed_config: expected a non-empty string"]),
]


@pytest.mark.parametrize("text, words", CONFIG_FILES, ids=[t.strip()[:30] for t, _ in CONFIG_FILES])
def test_bad_config_file(text, words, tmp_path, capsys, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    refused(["--config", str(path), "--data", "synthetic"], words, tmp_path, capsys, monkeypatch)


def test_missing_or_binary_config_file(tmp_path, capsys, monkeypatch):
    refused(["--config", str(tmp_path / "none.yaml")], ["--config: file not found"], tmp_path,
            capsys, monkeypatch)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    refused(["--config", str(binary)], ["--config", "not valid YAML or JSON"], tmp_path, capsys,
            monkeypatch)


# ------------------------------------------------------------------------------------------------
# DeepSpeed configs (checked before any process group: WORLD_SIZE is what the launcher sets)


def zero(**kwargs):
    return {"zero_optimization": {**SHIPPED["zero_optimization"], **kwargs}}


DEEPSPEED = [
    (zero(stage="two"), ["zero_optimization.stage='two'", "0, 1, 2, 3"]),
    (zero(stage=4), ["zero_optimization.stage=4", "0, 1, 2, 3"]),
    (zero(stage=-1), ["zero_optimization.stage=-1"]),
    (zero(stage=True), ["zero_optimization.stage=True"]),
    ({"gradient_accumulation_steps": 0}, ["gradient_accumulation_steps=0", "integer >= 1"]),
    ({"gradient_accumulation_steps": "2"}, ["gradient_accumulation_steps='2'"]),
    ({"gradient_accumulation_steps": 3}, ["--batch-size 16", "2 x 3"]),
    ({"train_batch_size": 32}, ["--batch-size 16 contradicts train_batch_size=32"]),
    ({**zero(stage=3), "fp16": {"enabled": True}}, ["fp16.enabled=true with zero_optimization.stage=3",
                                                    "stages 1 and 2", "bf16 at stage 3"]),
    ({**zero(stage=0), "fp16": {"enabled": True}}, ["fp16.enabled=true with zero_optimization.stage=0"]),
    ({**zero(stage=0), "bf16": {"enabled": True}}, ["bf16.enabled=true with zero_optimization.stage=0"]),
    (zero(round_robin_gradients=True), ["round_robin_gradients=true", "set it to false"]),
    (zero(mics_shard_size=2), ["mics_shard_size=2", "DeepSpeed 0.19.8 has removed MiCS",
                               "zero_hpz_partition_size"]),
    (zero(mics_shard_size=-1), ["mics_shard_size=-1", "remove the key"]),
    (zero(offload_optimizer={"device": "nvme", "nvme_path": "/tmp"}), ["offload_optimizer.device='nvme'"]),
    ({**zero(stage=3, offload_optimizer={"device": "nvme", "nvme_path": "/tmp"})}, ["'nvme'"]),
    ({**zero(offload_optimizer={"device": "cpu"}), "zero_force_ds_cpu_optimizer": True},
     ["zero_force_ds_cpu_optimizer=true", "DeepSpeedCPUAdam"]),
    ({**zero(stage=3), "tensor_parallel": {"autotp_size": 2}},
     ["tensor_parallel.autotp_size=2 with zero_optimization.stage=3", "stage 1 or 2"]),
    ({"sequence_parallel_size": 2}, ["sequence_parallel_size=2"]),
    ({"pipeline": {"stages": 2}}, ["pipeline.stages=2 with zero_optimization.stage=2",
                                   "use zero_optimization.stage=1"]),
    ({**zero(stage=1), "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
      "tensor_parallel": {"autotp_size": 2}}, ["grad_accum_dtype='fp32'", "BF16_Optimizer",
                                               "zero_optimization.stage=2"]),
    ({"scheduler": {"type": "Cosine", "params": {}}}, ["scheduler.type 'Cosine'", "WarmupCosineLR"]),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_stepz": 3}}},
     ["scheduler.params ['warmup_stepz']", "warmup_num_steps"]),
    (zero(reduce_bucket_size=-5), ["DeepSpeed refuses the config", "reduce_bucket_size"]),
    ({"gradient_clipping": 1.0}, ["conflicting clipping", "gradient_clipping=1.0"]),
    ({"gradient_clipping": -1}, ["gradient_clipping=-1", ">= 0"]),
    ({"gradient_clipping": "lots"}, ["gradient_clipping='lots'"]),
    ({"optimizer": {"type": "Adam", "params": {}}}, ["optimizer.type 'Adam' is not a stratopt_ds optimizer"]),
    ({"optimizer": {"type": "StratOpt2"}}, ["'StratOpt2'", "available"]),
    ({"optimizer": "stratopt"}, ['"optimizer" must be a mapping']),
    ({"optimizer": {"type": "StratOpt", "params": {"lr": -1}}}, ["optimizer.params.lr: expected a finite number > 0"]),
    ({"optimizer": {"type": "StratOpt", "params": {"beta3": 7}}}, ["optimizer.params", "beta3"]),
    ({"optimizer": {"type": "StratOpt", "params": {"max_grad_norm": 1.0}}}, ["max_grad_norm"]),
    ({"zero_optimization": "two"}, ["zero_optimization must be a mapping"]),
]


def test_deepspeed_itself_has_removed_mics():
    """What the MiCS refusal says: DeepSpeed 0.19.8 refuses the key itself, whatever its value."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError

    for value in (2, -1):
        with pytest.raises(DeepSpeedConfigError, match="MiCS ZeRO-3 sharding has been removed"):
            DeepSpeedConfig({"train_batch_size": 2, "zero_optimization": {
                "stage": 3, "mics_shard_size": value}})


@pytest.mark.parametrize("overrides, words", DEEPSPEED, ids=[json.dumps(o)[:50] for o, _ in DEEPSPEED])
def test_bad_deepspeed_config(overrides, words, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = {**SHIPPED, **overrides}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    refused(["--deepspeed_config", str(path), "--batch-size", "16", "--data", "synthetic"], words,
            tmp_path, capsys, monkeypatch)


def test_unreadable_deepspeed_configs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": ')
    for path, words in [(tmp_path / "none.json", ["cannot read DeepSpeed config"]),
                        (broken, ["is not valid JSON"])]:
        refused(["--deepspeed_config", str(path), "--data", "synthetic"], words, tmp_path, capsys,
                monkeypatch)


def test_the_shipped_config_is_accepted_at_any_world_size(monkeypatch):
    """Its global batch is the run's; its micro-batch (written for 2 ranks) is re-split, saying so."""
    config = str(ROOT / "ds_configs" / "tiny_zero2_cpu.json")
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = train.resolve_args(["--deepspeed_config", config, "--data", "synthetic"])
    assert run.config.batch_size == 16 and run.ranks == 2
    assert not any("train_micro_batch_size_per_gpu" in n for n in run.prepared.notes)
    monkeypatch.setenv("WORLD_SIZE", "4")
    run = train.resolve_args(["--deepspeed_config", config, "--data", "synthetic"])
    assert run.config.batch_size == 16 and run.ranks == 4
    assert "train_micro_batch_size_per_gpu=4 in --deepspeed_config" in run.prepared.notes[-1]
    assert "gives 2" in run.prepared.notes[-1]


# ------------------------------------------------------------------------------------------------
# Output paths


def test_out_naming_a_file_or_a_read_only_place(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    refused(["--data", "synthetic", "--out", str(a_file)], [f"--out {a_file}", "not a directory"],
            tmp_path, capsys, monkeypatch)
    assert a_file.read_text() == "x"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    refused(["--data", "synthetic", "--out", str(tmp_path / "run"), "--save-every", "1"],
            ["checkpoints exists and is not a directory"], tmp_path, capsys, monkeypatch)
