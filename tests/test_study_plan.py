"""Study plans: the shipped plans load and expand into their run lists; bad plans are refused
before anything runs, with a message naming the key, the value and what is allowed."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from stratopt_ds.optim import available_optimizers
from stratopt_ds.train_config import TrainConfig
from stratopt_ds.study.plan import PlanError, load_plan, parse_plan
from stratopt_ds.study.runner import StudyError, StudyRunner, run_study

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "stratopt_ds" / "study" / "plans"
LA_VARIANTS = [n for n in available_optimizers() if n.startswith("la-")]


@pytest.fixture(autouse=True)
def repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # plans name ds_configs/... relative to the repository


def fake_store(path: Path, train_tokens: int, val_tokens: int, tokenizer: str = "gpt2",
               vocab: int = 50257) -> Path:
    """A store at FineWeb scale without its data: the manifest, and sparse shards of the sizes
    it lists (no disk used). Enough for everything `study check` reads."""
    from stratopt_ds.data import store

    shard = store.DEFAULT_SHARD_TOKENS
    path.mkdir(parents=True)
    parts = {}
    for part, total in (("val", val_tokens), ("train", train_tokens)):
        parts[part] = []
        for i, lo in enumerate(range(0, total, shard)):
            name, n = f"{part}-{i:05d}.bin", min(shard, total - lo)
            with open(path / name, "wb") as f:
                f.truncate(2 * n)
            parts[part].append({"file": name, "tokens": n, "sha256": "0" * 64})
    manifest = {"format": store.FORMAT, "version": store.VERSION, "key": "fake", "dtype": "uint16",
                "shard_tokens": shard, "parts": parts, "fingerprint": "fake", "max_token_id": vocab - 1,
                "tokenizer": {"kind": "hf", "name": tokenizer, "vocab_size": vocab,
                              "eos_id": vocab - 1, "files": {}},
                "source": {"spec": "fineweb"}, "documents": {"val": 1, "train": 1, "read": 2},
                "tokens": {"val": val_tokens, "train": train_tokens}}
    (path / store.MANIFEST).write_text(json.dumps(manifest))
    return path


PROTOCOL_A_STORE = "fineweb10BT-gpt2-5.3B"
RUN_TOKENS = 10_000 * 512 * 1024  # 5.24B: one run of protocol A, at every size


@pytest.fixture
def stores(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATOPT_STORES", str(tmp_path))
    return tmp_path


def test_protocol_a_checks_its_store_against_the_plan(stores):
    with pytest.raises(PlanError, match=rf"train.data '{stores}/{PROTOCOL_A_STORE}': no such data "
                                        rf"file, directory or token store: .*data build.*STRATOPT_STORES"):
        load_plan(PLANS / "protocol_a.yaml")
    fake_store(stores / PROTOCOL_A_STORE, 5_300_000_000, 10_485_761)
    assert len(load_plan(PLANS / "protocol_a.yaml").runs()) == 195


@pytest.mark.parametrize("train, val, tokenizer, words", [
    (RUN_TOKENS, 10_485_761, "gpt2", "holds 5,119,999 training windows: the run would see data twice"),
    (5_300_000_000, 10_485_761, "byte", "--tokenizer gpt2 conflicts with the tokenizer of the store"),
    (5_300_000_000, 1_000_000, "gpt2", "--val-windows 10240 of --seq-len 1024 needs 10,485,761 "
                                       "validation tokens"),
])
def test_protocol_a_refuses_a_store_that_does_not_fit(stores, train, val, tokenizer, words):
    fake_store(stores / PROTOCOL_A_STORE, train, val, tokenizer)
    with pytest.raises(PlanError, match=re.escape(words)):
        load_plan(PLANS / "protocol_a.yaml")


def test_protocol_b_counts_its_epoch_from_the_store(stores):
    from stratopt_ds.study.runner import epoch_steps

    fake_store(stores / "fineweb10BT-gpt2-4Mdocs", 2_700_000_000, 10_485_761)
    plan = load_plan(PLANS / "protocol_b.yaml")
    assert epoch_steps(plan.runs()[0]) == (2_700_000_000 - 1) // 1024 // 512 == 5149


def test_protocol_b_refuses_a_store_smaller_than_one_step(stores):
    fake_store(stores / "fineweb10BT-gpt2-4Mdocs", 500 * 1024, 10_485_761)
    with pytest.raises(PlanError, match="1 epoch.* of the 499 training windows .* less than one step"):
        load_plan(PLANS / "protocol_b.yaml")


def test_protocol_a_expands_to_195_runs_of_paired_seeds():
    plan = load_plan(PLANS / "protocol_a.yaml", check_files=False)
    runs = plan.runs()
    assert len(LA_VARIANTS) == 12
    assert sorted(a.optimizer for a in plan.arms) == sorted(["adamw", *LA_VARIANTS])
    assert len(runs) == 13 * 3 * 5 == 195 and len({r.key for r in runs}) == 195
    assert [s.name for s in plan.sizes] == ["134m", "500m", "1b"]
    assert plan.baseline == "adamw" and plan.analysis["alpha"] == 0.01
    for size in plan.sizes:  # every arm of a size sees the same seed pairs
        seeds = {a.name: sorted((r.seed, r.data_seed) for r in runs
                                if r.size == size.name and r.arm == a.name) for a in plan.arms}
        assert len({tuple(v) for v in seeds.values()}) == 1 and len(seeds["adamw"]) == 5
    run = next(r for r in runs if r.size == "1b" and r.arm == "la-sqrt-b1depth-cliplayer")
    config = run.train_config(run.train["steps"])
    assert config.steps == 10000 and config.lr == 0.0003 and config.optimizer == run.optimizer
    assert (config.seed, config.data_seed, config.preset) == (run.seed, run.data_seed, "1b")
    assert run.deepspeed.num_gpus == 8 and run.deepspeed.config.endswith("ds_configs/1b_zero2.json")


def test_protocol_a_deepspeed_command_drops_the_config_optimizer(tmp_path):
    """The runner launches deepspeed with a copy of the shipped config minus "optimizer", so the
    arm's optimizer and lr apply (train.py refuses --optimizer against the config's)."""
    plan = load_plan(PLANS / "protocol_a.yaml", check_files=False)
    run = next(r for r in plan.runs() if r.size == "134m" and r.arm == "adamw")
    runner = StudyRunner(plan, PLANS / "protocol_a.yaml", tmp_path, 1, False, False)
    argv = runner.command(run, tmp_path, 10000, resume=True)
    assert Path(argv[0]).name == "deepspeed"
    assert argv[1:] == ["--num_gpus", "8", "--module", "stratopt_ds.train", "--config",
                        str(tmp_path / "train_config.json")]
    run_config = TrainConfig.read(argv[-1])  # what the training entry reads: no argument lists
    config = json.loads(Path(run_config.deepspeed_config).read_text())
    shipped = json.loads((ROOT / "ds_configs" / "134m_zero2.json").read_text())
    assert "optimizer" not in config and config["zero_optimization"] == shipped["zero_optimization"]
    assert run_config.optimizer == "adamw" and run_config.resume and run_config.out == str(tmp_path)
    assert run_config.steps == 10000 and not run_config.progress
    opt_args = run_config.opt_args
    assert opt_args == {"clip": "global", "clip_threshold": 1.0}


def test_protocol_a_refuses_parallel_jobs(tmp_path, stores):
    fake_store(stores / PROTOCOL_A_STORE, 5_300_000_000, 10_485_761)
    with pytest.raises(StudyError, match="--jobs 2: this plan launches deepspeed"):
        run_study(PLANS / "protocol_a.yaml", tmp_path, jobs=2)


def test_protocol_b_has_the_three_ablations_and_one_epoch():
    plan = load_plan(PLANS / "protocol_b.yaml", check_files=False)
    assert [a.optimizer for a in plan.arms] == ["adamw", "ademamix", "stratopt", "stratopt-noscale",
                                                "stratopt-nomix", "stratopt-noclip"]
    assert len(plan.runs()) == 30
    assert all(r.train["epochs"] == 1 and "steps" not in r.train for r in plan.runs())


def test_cpu_small_reads_shared_data_from_the_environment(tmp_path, monkeypatch):
    corpus = tmp_path / "data" / "wikitext-2" / "test.txt"
    corpus.parent.mkdir(parents=True)
    corpus.write_text("some text\n\nmore text\n" * 2000)  # holds the plan's 256 windows of 128
    monkeypatch.setenv("STRATOPT_SHARED", str(tmp_path))
    plan = load_plan(PLANS / "cpu_small.yaml")
    assert len(plan.runs()) == 25 and len(plan.arms) == 5
    assert {r.train["data"] for r in plan.runs()} == {str(corpus)}
    monkeypatch.setenv("STRATOPT_SHARED", str(tmp_path / "elsewhere"))
    with pytest.raises(PlanError, match="train.data .*data file not found: .*elsewhere.*STRATOPT_SHARED"):
        load_plan(PLANS / "cpu_small.yaml")


def tiny_plan() -> dict:
    return yaml.safe_load((PLANS / "ci_tiny.yaml").read_text())


def broken(edit) -> str:
    raw = copy.deepcopy(tiny_plan())
    edit(raw)
    with pytest.raises(PlanError) as info:
        parse_plan(raw)
    return str(info.value)


def test_bad_plans_are_refused_with_a_clear_message():
    msg = broken(lambda p: p["arms"].append("adamw-typo"))
    assert "arms[2].optimizer: unknown optimizer 'adamw-typo'" in msg and "la-sqrt-b1depth" in msg
    msg = broken(lambda p: p.update(extra=1))
    assert "unknown key 'extra'; allowed: name, description" in msg
    msg = broken(lambda p: p["train"].update(stepz=5))
    assert "train: unknown train option 'stepz'; allowed: steps, epochs" in msg
    msg = broken(lambda p: p["arms"][0]["opt_args"].update(clip_tau=2, betaz=1))
    assert "arms[0].opt_args: unknown hyperparameter 'betaz' for adamw; allowed:" in msg
    msg = broken(lambda p: p["arms"][0]["opt_args"].update(clip="sometimes"))
    assert "arms 'adamw'.opt_args" in msg and "sometimes" in msg
    msg = broken(lambda p: p["arms"].append({"name": "hot", "optimizer": "adamw", "lr": -1}))
    assert "arms[2].lr: expected a finite number > 0, got -1" in msg
    msg = broken(lambda p: p["train"].update(data="/no/such/corpus.txt"))
    assert "train.data '/no/such/corpus.txt': data file not found: /no/such/corpus.txt" in msg
    msg = broken(lambda p: p["train"].update(epochs=1))
    assert "give exactly one of train.steps and train.epochs (got both)" in msg
    msg = broken(lambda p: (p["train"].update(epochs=1, data="fineweb"), p["train"].pop("steps"),
                            p["train"].pop("max_docs")))
    assert "train.epochs of 'fineweb' (FineWeb) needs a corpus of a fixed size" in msg
    msg = broken(lambda p: p.update(baseline="sgd"))
    assert "baseline: 'sgd' is not an arm; arms: adamw, stratopt" in msg
    msg = broken(lambda p: p["sizes"]["tiny"].update(preset="13b"))
    assert "sizes.tiny.preset: unknown preset '13b'; available: tiny, 134m" in msg
    msg = broken(lambda p: p["arms"].append("stratopt"))
    assert "duplicate arm name 'stratopt'" in msg
    msg = broken(lambda p: p["analysis"].update(alpha=1.5) if "analysis" in p
                 else p.update(analysis={"alpha": 1.5}))
    assert "analysis.alpha: expected a number in (0, 1), got 1.5" in msg
    msg = broken(lambda p: p["train"].update(data="${NO_SUCH_VARIABLE_X}/a.txt"))
    assert "environment variable NO_SUCH_VARIABLE_X is not set" in msg


@pytest.mark.parametrize("seeds, expected", [
    ({"init": [0, -1], "data": [1, 2]}, "seeds.init: seeds must be integers >= 0; bad: [-1]"),
    ({"init": [0, 0], "data": [1, 2]}, "seeds.init: seeds must be distinct"),
    ({"init": [0, 1], "data": [1]}, "init has 2 seeds and data 1"),
    ({"init": [0, True]}, "bad: [True]"),
    ([], "seeds.init: expected a non-empty list"),
    ({"init": [0], "order": [1]}, "seeds: unknown key 'order'; allowed: init, data"),
])
def test_bad_seeds(seeds, expected):
    assert expected in broken(lambda p: p.update(seeds=seeds))


def test_deepspeed_batch_must_divide(tmp_path):
    raw = tiny_plan()
    raw["sizes"]["tiny"]["deepspeed"] = {"config": "ds_configs/tiny_zero2_cpu.json", "num_gpus": 2}
    raw["train"]["batch_size"] = 6  # accumulation 2 x 2 ranks = 4 does not divide 6
    with pytest.raises(PlanError, match="batch_size 6 is not divisible by ranks x gradient_accumulation_steps = 2 x 2"):
        parse_plan(raw)
    raw["sizes"]["tiny"]["deepspeed"]["config"] = "ds_configs/none.json"
    with pytest.raises(PlanError, match="sizes.tiny.deepspeed.config: file not found"):
        parse_plan(raw)
