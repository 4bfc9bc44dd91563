"""TrainConfig: one table of training options, filled from the command line, a file or a plan."""
from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from stratopt_ds import train
from stratopt_ds.study.plan import TRAIN_OPTIONS, PlanError, parse_plan
from stratopt_ds.train_config import (FIELDS, PLAN_OPTIONS, ConfigError, TrainConfig,
                                      build_parser, flag)

from helpers import assert_usage_error


def test_every_field_has_a_flag_a_type_and_help():
    parser = build_parser()
    flags = {s for action in parser._actions for s in action.option_strings}
    for name, f in FIELDS.items():
        assert f.metadata["help"] and f.metadata["kind"] in ("int", "float", "str", "bool", "dict")
        spelled = f"--no-{name.replace('_', '-')}" if f.default is True else flag(name)
        assert spelled in flags, name
    # only the file switch and the launcher's --local_rank are not fields
    fields_of_flags = {a.dest for a in parser._actions if a.option_strings} - {"help"}
    assert fields_of_flags - set(FIELDS) == {"config", "local_rank"}


def test_defaults_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"steps": 7, "lr": 0.01, "opt_args": {"beta3": 0.99},
                                    "tensorboard": False, "data": "synthetic"}))
    config = train_config_of(["--config", str(path), "--steps", "9", "--opt-args", "clip=global"])
    assert config.steps == 9 and config.lr == 0.01 and not config.tensorboard  # the flag wins
    assert config.opt_args == {"beta3": 0.99, "clip": "global"}  # merged, the flag's key last
    assert config.eval_every == TrainConfig().eval_every  # neither: the default
    assert train_config_of([]) == TrainConfig()


def train_config_of(argv):
    from stratopt_ds import train_config

    return train_config.from_args(build_parser(), argv)


@pytest.mark.parametrize("content, words", [
    ({"stepz": 3}, ["unknown training option 'stepz'", "allowed:", "steps"]),
    ({"steps": "3"}, [".steps: expected an integer >= 1, got '3'"]),
    ({"lr": -1}, [".lr: expected a finite number > 0"]),
    ({"tensorboard": "no"}, [".tensorboard: expected true or false"]),
    ([1, 2], ["expected a mapping of training options"]),
])
def test_a_bad_config_file_names_the_key(tmp_path, capsys, content, words):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    assert_usage_error(train.main, ["--config", str(path)], [str(path), *words], capsys)


def test_a_missing_or_broken_config_file_is_a_usage_error(tmp_path, capsys):
    assert_usage_error(train.main, ["--config", str(tmp_path / "none.yaml")], ["--config", "not found"],
                       capsys)
    broken = tmp_path / "broken.json"
    broken.write_text('{"steps": ')
    assert_usage_error(train.main, ["--config", str(broken)], ["not valid YAML or JSON"], capsys)


def test_a_config_object_trains_exactly_like_its_command_line(tmp_path):
    """main(TrainConfig) and main(argv) are the same run; the config round-trips through JSON."""
    argv = ["--steps", "3", "--data", "synthetic", "--max-docs", "200", "--optimizer", "stratopt",
            "--opt-args", "clip=global", "--no-tensorboard", "--no-progress", "--eval-batches", "1",
            "--out", str(tmp_path / "cli")]
    by_cli = train.main(argv)
    config = TrainConfig(steps=3, data="synthetic", max_docs=200, optimizer="stratopt",
                         opt_args={"clip": "global"}, tensorboard=False, progress=False,
                         eval_batches=1, out=str(tmp_path / "obj"))
    config.write(tmp_path / "c.json")
    assert TrainConfig.read(tmp_path / "c.json") == config
    by_object = train.main(TrainConfig.read(tmp_path / "c.json"))
    assert by_object.losses == by_cli.losses and by_object.val_losses == by_cli.val_losses
    assert by_object.hyperparams == by_cli.hyperparams


def test_resolve_fills_the_preset_and_the_run_policy_verdict():
    run = train.resolve(TrainConfig(data="synthetic", steps=50, opt_args={"clip": "global"}))
    assert run.config.batch_size == 8 and run.config.seq_len == 64 and run.config.warmup_steps == 5
    assert run.config.optimizer == "stratopt" and run.config.lr == run.hyperparams["lr"] == 3e-3
    assert run.hyperparams["t_alpha"] == 50  # the slow-momentum warm-up spans the run
    assert run.prepared.deepspeed is None and run.prepared.notes == []  # no engine, no engine clip
    with pytest.raises(ConfigError, match="--steps must be >= 1, got 0"):
        train.resolve(TrainConfig(steps=0))


def test_plans_take_their_train_options_from_the_config_table():
    """The plan's option list is TrainConfig's (plus epochs); its checks are TrainConfig's."""
    assert set(TRAIN_OPTIONS) == set(PLAN_OPTIONS) | {"epochs"}
    for name in PLAN_OPTIONS:
        assert FIELDS[name].metadata["plan"]

    def plan(**train_options):
        return {"name": "p", "baseline": "adamw", "seeds": [0], "arms": ["adamw"],
                "sizes": {"tiny": {"preset": "tiny"}},
                "train": {"steps": 5, "data": "synthetic", **train_options}}

    built = parse_plan(plan(diverge_after=3, tensorboard=False), check_files=False)
    config = built.runs()[0].train_config(5)
    assert dataclasses.asdict(config) | {"diverge_after": 3} == dataclasses.asdict(config)
    assert not config.tensorboard and config.optimizer == "adamw"
    with pytest.raises(PlanError, match=r"train.diverge_after: expected an integer >= 1, got 0"):
        parse_plan(plan(diverge_after=0), check_files=False)
    with pytest.raises(PlanError, match=r"train.eval_batches: expected an integer >= 1, got 0"):
        parse_plan(plan(eval_batches=0), check_files=False)  # a study needs validation losses
    with pytest.raises(PlanError, match="unknown train option 'out'"):
        parse_plan(plan(out="x"), check_files=False)  # the runner decides where runs go


def test_the_study_writes_what_the_training_entry_reads(tmp_path):
    """A study run is a TrainConfig in <run>/train_config.json, not an argument list."""
    from stratopt_ds.study.runner import StudyRunner

    raw = {"name": "p", "baseline": "adamw", "seeds": [3], "arms": ["adamw"],
           "sizes": {"tiny": {"preset": "tiny"}}, "train": {"steps": 20, "data": "synthetic"}}
    built = parse_plan(raw, check_files=False)
    run = built.runs()[0]
    argv = StudyRunner(built, tmp_path / "p.yaml", tmp_path, 1, False, False).command(
        run, tmp_path, 20, resume=False)
    assert argv[-2:] == ["--config", str(tmp_path / "train_config.json")]
    written = json.loads((tmp_path / "train_config.json").read_text())
    assert set(written) == set(FIELDS)
    config = TrainConfig.read(tmp_path / "train_config.json")
    assert (config.seed, config.data_seed, config.steps, config.out) == (3, 3, 20, str(tmp_path))
    assert config.save_every == 2 and not config.progress  # resumable by default, quiet


def test_a_study_started_by_an_earlier_version_goes_on(tmp_path):
    """Its run specs list command-line arguments: they are read as the TrainConfig they mean."""
    from stratopt_ds.study.results import SPEC_FILE
    from stratopt_ds.study.runner import StudyError, StudyRunner

    raw = {"name": "p", "baseline": "adamw", "seeds": [3], "arms": ["adamw"],
           "sizes": {"tiny": {"preset": "tiny"}},
           "train": {"steps": 20, "data": "synthetic", "tensorboard": False}}
    built = parse_plan(raw, check_files=False)
    run = built.runs()[0]
    runner = StudyRunner(built, tmp_path / "p.yaml", tmp_path, 1, False, False)
    runner.specs = {run.key: runner.spec(run)}
    old_args = ["--optimizer", "adamw", "--preset", "tiny", "--steps", "20", "--seed", "3",
                "--data-seed", "3", "--data", "synthetic", "--no-tensorboard"]
    run_dir = run.directory(tmp_path)
    run_dir.mkdir(parents=True)
    old_spec = {"run": run.key, "seed": 3, "data_seed": 3, "steps": 20, "train_args": old_args,
                "deepspeed": None}
    (run_dir / SPEC_FILE).write_text(json.dumps(old_spec))
    runner.check_same_spec(run, run_dir)  # the same run: accepted
    old_spec["train_args"] = old_args[:-1]  # tensorboard on: another run
    (run_dir / SPEC_FILE).write_text(json.dumps(old_spec))
    with pytest.raises(StudyError, match="other settings.*train_config"):
        runner.check_same_spec(run, run_dir)


def test_small_numbers_survive_the_round_trip_through_files(tmp_path):
    """YAML 1.1 reads 1e-5 as a string; the config files and plans read it as a number."""
    config = TrainConfig(lr=1e-5, opt_args={"eps": 1e-8, "betas": [0.9, 0.95]})
    config.write(tmp_path / "c.json")
    assert TrainConfig.read(tmp_path / "c.json") == config
    (tmp_path / "c.yaml").write_text("lr: 1e-5\nopt_args: {eps: 1e-8}\n")
    back = TrainConfig.read(tmp_path / "c.yaml")
    assert back.lr == 1e-5 and back.opt_args == {"eps": 1e-8}


def test_boolean_flags_undo_a_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("tensorboard: false\nresume: true\n")
    config = train_config_of(["--config", str(tmp_path / "c.yaml"), "--tensorboard", "--no-resume"])
    assert config.tensorboard and not config.resume
