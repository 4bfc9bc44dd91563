"""Bad study input (issue 15): ``study check`` / ``study run`` refuse a plan whose data cannot be
read (binary, corrupt, a directory without sources, a tokenizer not to be had offline) or cannot
provide ``seq_len`` (exit code 2, naming the run, the key and the file, nothing written), and
``study run`` exits 1 when runs diverged or failed, listing each by key with its reason."""
from __future__ import annotations

import gzip
import random
import sys
from pathlib import Path

import pytest
import yaml

from stratopt_ds.study import __main__ as study_cli
from stratopt_ds.study.runner import StudyRunner

ROOT = Path(__file__).resolve().parents[1]
CI_PLAN = ROOT / "stratopt_ds" / "study" / "plans" / "ci_tiny.yaml"
TEXT = "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog.\n\n" for i in range(40))


def write_plan(directory: Path, edit) -> Path:
    raw = yaml.safe_load(CI_PLAN.read_text())
    edit(raw)
    path = directory / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def data_file(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def set_train(**options):
    def edit(raw):
        raw["train"].update(options)
    return edit


def bad_plans(tmp_path: Path) -> dict:
    """name -> (plan edit, words of the message)."""
    binary = data_file(tmp_path, "random.txt", random.Random(0).randbytes(4000))
    gz = data_file(tmp_path, "docs.jsonl", gzip.compress(b'{"text": "hello"}\n' * 50))
    parquet = data_file(tmp_path, "broken.parquet", random.Random(1).randbytes(4000))
    small = data_file(tmp_path, "small.txt", TEXT.encode())  # about 2,400 bytes
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.md").write_text("no data here")

    def size_seq_len(raw):
        raw["train"]["data"] = str(small)
        raw["sizes"]["tiny"]["seq_len"] = 256

    def arm_seq_len(raw):
        raw["train"]["data"] = str(small)
        raw["arms"][1] = {"name": "stratopt", "optimizer": "stratopt", "seq_len": 256}

    return {
        "binary": (set_train(data=str(binary)),
                   ["run tiny/adamw", "train.data", str(binary), "not UTF-8 text"]),
        "gzip": (set_train(data=str(gz)), ["train.data", str(gz), "gzip data", "decompress"]),
        "parquet": (set_train(data=str(parquet)),
                    ["train.data", str(parquet), "not a readable Parquet file"]),
        "no-sources": (set_train(data=str(empty)),
                       ["train.data", "a directory, but neither a token store", "only notes.md"]),
        "seq_len": (set_train(data=str(small), seq_len=256),
                    ["run tiny/adamw", "train.data", "--seq-len 256", str(small),
                     "holds 2,350 tokens", "a run needs 4,354"]),
        "size-seq_len": (size_seq_len, ["run tiny/adamw", "--seq-len 256"]),
        "arm-seq_len": (arm_seq_len, ["run tiny/stratopt", "--seq-len 256"]),
        "max_docs": (set_train(max_docs=1),
                     ["train.data 'synthetic'", "--seq-len 32", "(--max-docs 1)"]),
        "bpe": (set_train(data=str(small), tokenizer="bpe", seq_len=256),
                ["holds at most", "--tokenizer bpe"]),
        "val_windows": (set_train(data=str(small), val_windows=200),
                        ["--val-windows 200", "a run needs"]),
        "tokenizer": (set_train(tokenizer="no-such-org/no-such-tok"),
                      ["--tokenizer 'no-such-org/no-such-tok'", "not in the Hugging Face cache",
                       "'byte'"]),
    }


BAD = ["binary", "gzip", "parquet", "no-sources", "seq_len", "size-seq_len", "arm-seq_len",
       "max_docs", "bpe", "val_windows", "tokenizer"]


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("name", BAD)
def test_a_plan_with_unusable_data_is_refused(tmp_path, capsys, monkeypatch, name, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    edit, words = bad_plans(tmp_path)[name]
    plan = write_plan(tmp_path, edit)
    out = tmp_path / "out"
    argv = [command, str(plan)] + (["--out", str(out), "--no-progress"] if command == "run" else [])
    assert study_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("plan error: ") and err.count("\n") == 1, err  # one line, no traceback
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()


def test_a_plan_whose_source_just_fits_passes(tmp_path, capsys):
    """The check is exact for 'byte': 40 paragraphs hold 2,400-odd tokens; seq_len 32 with 16
    validation windows needs 546."""
    small = data_file(tmp_path, "small.txt", TEXT.encode())
    plan = write_plan(tmp_path, set_train(data=str(small)))
    assert study_cli.main(["check", str(plan)]) == 0
    assert "ci_tiny: 4 runs" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Failed runs: exit code 1, each listed by key with its reason


def crash(self, run, run_dir, steps, resume):
    """The training command of every run: a process that dies as an out-of-memory kill would."""
    return [sys.executable, "-c", "print('RuntimeError: out of memory'); raise SystemExit(7)"]


def test_a_study_whose_runs_all_crashed_exits_1_and_lists_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(StudyRunner, "command", crash)
    plan = write_plan(tmp_path, lambda raw: None)
    out = tmp_path / "out"
    argv = ["run", str(plan), "--out", str(out), "--no-progress"]
    assert study_cli.main(argv) == 1
    err = capsys.readouterr().err
    for key in ("tiny/adamw/seed0", "tiny/stratopt/seed0", "tiny/adamw/seed1", "tiny/stratopt/seed1"):
        assert f"FAILED {key}: failed: exit code 7, no summary.json; log: RuntimeError: out of " \
               f"memory" in err, err
    assert "error: 4 of 4 runs diverged or failed" in err and "--retry-failed" in err
    # run again: the failures are recorded, not retried, and still make the exit code
    assert study_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "failed earlier (not retried)" in err and err.count("FAILED tiny/") == 4


def test_a_study_with_a_diverged_run_exits_1_and_names_only_that_run(tmp_path, capsys):
    """Real training: adamw finishes, adamw-hot (lr 1e4) diverges; --report is still written."""
    def edit(raw):
        raw["seeds"] = {"init": [0], "data": [100]}
        raw["train"].update(steps=8, eval_every=4, save_every=4)
        raw["arms"] = [raw["arms"][0], {"name": "adamw-hot", "optimizer": "adamw", "lr": 1.0e4,
                                        "diverge_after": 3}]
    plan = write_plan(tmp_path, edit)
    out = tmp_path / "out"
    assert study_cli.main(["run", str(plan), "--out", str(out), "--no-progress", "--report"]) == 1
    captured = capsys.readouterr()
    assert "FAILED tiny/adamw-hot/seed0: diverged" in captured.err
    assert "tiny/adamw/seed0" not in captured.err.replace("adamw-hot", "")
    assert "error: 1 of 2 runs diverged or failed" in captured.err
    assert "report:" in captured.out and (out / "report" / "report.md").is_file()
    # the same directory with a plan of the finished arm only: nothing failed, exit code 0
    ok_plan = write_plan(tmp_path, lambda raw: (edit(raw), raw["arms"].pop()))
    assert study_cli.main(["run", str(ok_plan), "--out", str(out), "--no-progress"]) == 0
    assert "FAILED" not in capsys.readouterr().err


@pytest.mark.parametrize("flags, plan_slurm, words", [
    (["--max-timeouts", "-1"], {}, ["--max-timeouts", "slurm.max_timeouts", ">= 0", "-1"]),
    (["--nodes-per-run", "0"], {}, ["--nodes-per-run", ">= 1", "got 0"]),
    (["--mem-gb", "0"], {}, ["--mem-gb", "> 0"]),
    ([], {"time_min": 1}, ["--signal-delay-s", "shorter than the time limit (60 s)", "120"]),
])
def test_bad_slurm_options_stop_before_anything_is_written(tmp_path, capsys, flags, plan_slurm,
                                                           words):
    plan = write_plan(tmp_path, lambda raw: raw.update(slurm=plan_slurm) if plan_slurm else None)
    out = tmp_path / "out"
    assert study_cli.main(["run", str(plan), "--out", str(out), "--executor", "slurm",
                           *flags]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not out.exists()
