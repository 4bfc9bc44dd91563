"""Damaged and crafted checkpoints: loading never runs code, and a damaged newest checkpoint
makes --resume fall back to the previous complete one, saying which file was bad.

Real files throughout, written by real runs: one process through ``stratopt_ds.train.main``;
DeepSpeed (2 CPU ranks, ZeRO-2) through the launcher, with the damage cases judged before any
process group by :func:`stratopt_ds.resume.resume_point` and one resumed launch; crafted
DeepSpeed and sharded files in one 1-rank launch of tests/dist/checkpoint_fault_worker.py
(loading them needs a real engine).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import flip_tensor_byte, free_port
from stratopt_ds import data, resume, safe_load, train
from stratopt_ds.safe_load import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--no-progress", "--eval-batches", "1", "--no-tensorboard", "--keep-checkpoints", "0"]


class TouchOnLoad:
    """Unpickling this creates ``target``: what any code in a checkpoint could do instead."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.target),)


# ------------------------------------------------------------------------------------------------
# Damage, done to real files


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def garble(path: Path) -> None:
    path.write_text('{"optimizer": "stratopt", ')  # cut off mid-write


def failure_message(call, capsys) -> str:
    """What a refused ``call`` reports: a CheckpointError's message, or a usage exit's stderr."""
    with pytest.raises((CheckpointError, SystemExit)) as exc:
        call()
    if isinstance(exc.value, SystemExit):
        assert exc.value.code == 2
        return capsys.readouterr().err
    return str(exc.value)


# ------------------------------------------------------------------------------------------------
# The safe loader on its own


def test_a_crafted_file_is_refused_and_its_code_never_runs(tmp_path):
    target = tmp_path / "created"
    crafted = tmp_path / "crafted.pt"
    torch.save({"weights": torch.ones(3), "extra": TouchOnLoad(target)}, crafted)
    with pytest.raises(CheckpointError) as exc:
        safe_load.load(crafted)
    assert str(crafted) in str(exc.value) and "refused" in str(exc.value)
    assert "getattr" in str(exc.value)  # the global the pickle asked for
    assert not target.exists()
    torch.load(crafted, weights_only=False)  # the control: the file is a real threat
    assert target.exists()


@pytest.mark.parametrize("damage, words", [(truncate, "truncated or corrupted"), (empty, "empty"),
                                           (Path.unlink, "missing"),
                                           (flip_tensor_byte, "truncated or corrupted")])
def test_a_damaged_file_names_itself(tmp_path, damage, words):
    path = tmp_path / "state.pt"
    torch.save({"w": torch.arange(10_000.0)}, path)
    damage(path)
    with pytest.raises(CheckpointError, match=words) as exc:
        safe_load.load(path)
    assert str(path) in str(exc.value)


def test_legacy_and_crc_less_files_still_load(tmp_path):
    legacy, crc_less = tmp_path / "legacy.pt", tmp_path / "nocrc.pt"
    torch.save({"w": torch.arange(5.0)}, legacy, _use_new_zipfile_serialization=False)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(5.0)}, crc_less)
    finally:
        torch.serialization.set_crc32_options(True)
    for path in (legacy, crc_less):
        assert safe_load.check_file(path) is None
        assert torch.equal(safe_load.load(path)["w"], torch.arange(5.0))
    truncate(legacy)  # no index to check beforehand: caught when loading
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        safe_load.load(legacy)


def test_sharded_rank_files_are_checked_and_refused_by_name(tmp_path):
    """zero.checkpoint's reader alone (load_sharded on a real engine: the dist test below)."""
    from stratopt_ds.zero import checkpoint

    def write(rank: int, **extra) -> Path:
        path = tmp_path / f"rank{rank:05d}.pt"
        torch.save({"format": checkpoint.FORMAT, "world": 2, "rank": rank, "fragments": [],
                    "step": 1.0, **extra}, path)
        return path

    write(0, layer_stats={"beta": torch.zeros(3)}), write(1)
    assert [p["rank"] for p in checkpoint._load_all(str(tmp_path))] == [0, 1]
    crafted = write(1, extra=TouchOnLoad(tmp_path / "created"))
    with pytest.raises(CheckpointError, match=f"{crafted}: refused"):
        checkpoint._load_all(str(tmp_path))
    assert not (tmp_path / "created").exists()
    truncate(write(1))
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'rank00001.pt'}: truncated or corrupted"):
        checkpoint._load_all(str(tmp_path))
    (tmp_path / "rank00001.pt").unlink()
    with pytest.raises(CheckpointError, match="saved by 2 ranks but 1 rank files found .missing: rank00001.pt"):
        checkpoint._load_all(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# One process: stratopt_ds.train --resume


def train_args(out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--steps", "6", "--save-every", "2", *FAST, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    summary = train.main(train_args(out))
    return out, summary


def killed_after_step_4(reference, tmp_path) -> Path:
    """A copy of the reference as if killed between steps 4 and 6."""
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    (out / "summary.json").unlink()
    shutil.rmtree(out / "checkpoints" / "step_6")
    resume.write_latest(out / "checkpoints", "step_4")
    return out


LATEST = "checkpoints/latest"
SINGLE_CASES = {  # damage -> (file, how, checkpoint resumed, words of the note)
    "truncated state.pt": ("checkpoints/step_4/state.pt", truncate, 2,
                           "checkpoint step_4 is unusable (state.pt: truncated or corrupted); "
                           "resuming from step_2"),
    "empty state.pt": ("checkpoints/step_4/state.pt", empty, 2, "(state.pt: empty)"),
    "missing state.pt": ("checkpoints/step_4/state.pt", Path.unlink, 2, "(state.pt: missing)"),
    "garbled run.json": ("checkpoints/step_4/run.json", garble, 2, "(run.json: unreadable"),
    "garbled files.json": ("checkpoints/step_4/files.json", garble, 2, "(files.json: unreadable"),
    "empty latest": (LATEST, empty, 4, "latest is empty"),
    "latest names no directory": (LATEST, lambda p: p.write_text("step_8\n"), 4,
                                  "latest names 'step_8', which does not exist"),
    "missing latest": (LATEST, Path.unlink, 4, "latest is missing"),
}


@pytest.mark.parametrize("case", SINGLE_CASES)
def test_resume_falls_back_past_a_damaged_checkpoint(reference, tmp_path, capsys, case):
    name, damage, resumed_at, note = SINGLE_CASES[case]
    out = killed_after_step_4(reference, tmp_path)
    damage(out / name)
    capsys.readouterr()
    summary = train.main(train_args(out, "--resume"))
    said = "".join(capsys.readouterr())
    assert note in said, said
    assert f"resumed from {out / 'checkpoints' / f'step_{resumed_at}'} at step {resumed_at}" in said
    assert summary.resumed_from == resumed_at and summary.steps_done == 6
    assert summary.losses == reference[1].losses  # bit for bit
    assert summary.val_losses == reference[1].val_losses
    assert summary.data_state == reference[1].data_state
    assert resume.resume_point(out / "checkpoints", json.loads(
        (out / "checkpoints" / "step_6" / "run.json").read_text())) == ("step_6", [])


def test_a_crafted_state_pt_is_refused_by_resume(reference, tmp_path, capsys):
    out = killed_after_step_4(reference, tmp_path)
    state_pt = out / "checkpoints" / "step_4" / "state.pt"
    state = safe_load.load(state_pt)
    state["client"]["extra"] = TouchOnLoad(tmp_path / "created")
    torch.save(state, state_pt)
    said = failure_message(lambda: train.main(train_args(out, "--resume")), capsys)
    assert str(state_pt) in said and "refused" in said
    assert not (tmp_path / "created").exists()


def test_a_bit_flip_found_only_at_load_time_names_the_file(reference, tmp_path, capsys):
    out = killed_after_step_4(reference, tmp_path)
    state_pt = out / "checkpoints" / "step_4" / "state.pt"
    flip_tensor_byte(state_pt)
    said = failure_message(lambda: train.main(train_args(out, "--resume")), capsys)
    assert str(state_pt) in said and "truncated or corrupted" in said


def test_a_different_run_is_refused_not_skipped(reference, tmp_path):
    """Another experiment's checkpoint is not damage: no older checkpoint is tried past it."""
    out = killed_after_step_4(reference, tmp_path)
    ckpt = out / "checkpoints"
    identity = json.loads((ckpt / "step_4" / "run.json").read_text())
    with pytest.raises(ValueError, match="different run") as exc:
        resume.resume_point(ckpt, {**identity, "seed": 5})
    assert "seed: 0 in the checkpoint, 5 now" in str(exc.value)
    garble(ckpt / "step_4" / "run.json")  # skipped as damaged; step_2 is then another run's
    other = json.loads((ckpt / "step_2" / "run.json").read_text())
    (ckpt / "step_2" / "run.json").write_text(json.dumps({**other, "steps": 99}))
    with pytest.raises(ValueError, match="steps: 99 in the checkpoint, 6 now"):
        resume.resume_point(ckpt, identity)


def test_nothing_usable_left_names_every_checkpoint(reference, tmp_path):
    out = killed_after_step_4(reference, tmp_path)
    ckpt = out / "checkpoints"
    identity = json.loads((ckpt / "step_4" / "run.json").read_text())
    truncate(ckpt / "step_4" / "state.pt")
    (ckpt / "step_2" / "state.pt").unlink()
    with pytest.raises(CheckpointError) as exc:
        resume.resume_point(ckpt, identity)
    said = str(exc.value)
    assert "checkpoint step_4 is unusable (state.pt: truncated or corrupted)" in said
    assert "checkpoint step_2 is unusable (state.pt: missing)" in said
    assert "without --resume" in said


def test_an_unfinished_newer_save_is_never_tried_and_never_pruned(reference, tmp_path):
    out = killed_after_step_4(reference, tmp_path)
    ckpt = out / "checkpoints"
    identity = json.loads((ckpt / "step_4" / "run.json").read_text())
    (ckpt / "step_6").mkdir()  # a save in place (DeepSpeed) killed half-way: no run.json yet
    (ckpt / "step_6" / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04half")
    assert resume.resume_point(ckpt, identity) == ("step_4", [])
    (ckpt / "latest").unlink()
    name, notes = resume.resume_point(ckpt, identity)
    assert name == "step_4" and notes == [
        f"{ckpt / 'latest'} is missing; checkpoint step_6 is unusable (run.json: missing, the save did "
        "not finish); resuming from step_4"]
    resume.write_latest(ckpt, "step_4")
    resume.prune(ckpt, 1)
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_4", "step_6"]


# ------------------------------------------------------------------------------------------------
# DeepSpeed: 2 CPU ranks, ZeRO-2


def launch(out: Path, store: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "stratopt_ds.train", "--deepspeed_config", str(ROOT / "ds_configs" / "tiny_zero2_cpu.json"),
           "--steps", "4", "--batch-size", "16", "--save-every", "2", "--out", str(out), "--data", str(store),
           *FAST, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


OPTIM = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"
DS_CASES = {  # damage -> [(file in step_4, how)], words of the note
    "truncated optimizer shard": ([(OPTIM.format(1), truncate)],
                                  f"checkpoint step_4 is unusable ({OPTIM.format(1)}: truncated or corrupted); "
                                  "resuming from step_2"),
    "missing optimizer shard": ([(OPTIM.format(0), Path.unlink)], f"({OPTIM.format(0)}: missing)"),
    "empty model states": ([(MODEL, empty)], f"({MODEL}: empty)"),
    "truncated model states": ([(MODEL, truncate)], f"({MODEL}: truncated or corrupted)"),
    "shard missing, saved before files.json": ([("files.json", Path.unlink), (OPTIM.format(1), Path.unlink)],
                                               f"({OPTIM.format(1)}: missing)"),
    "garbled run.json": ([("run.json", garble)], "(run.json: unreadable"),
}


@pytest.mark.dist
def test_deepspeed_resume_falls_back_past_a_damaged_checkpoint(tmp_path):
    store = data.build_store("synthetic", tmp_path / "store", data.BuildSettings(val_tokens=10_000),
                             progress=False)
    ref = tmp_path / "reference"
    launch(ref, store.path)
    losses = json.loads((ref / "summary.json").read_text())["losses"]
    step_4 = ref / "checkpoints" / "step_4"
    identity = json.loads((step_4 / "run.json").read_text())
    saved = json.loads((step_4 / "files.json").read_text())["files"]
    assert saved == sorted([MODEL, OPTIM.format(0), OPTIM.format(1)])

    # Every file loads with DeepSpeed's three classes allowed, and each class is needed.
    allowed = safe_load.deepspeed_globals()
    for name in saved:
        safe_load.load(step_4 / name, allow=allowed)
    for left_out in allowed:
        with pytest.raises(CheckpointError, match=f"needs {left_out.__module__}.{left_out.__qualname__}"):
            safe_load.load(step_4 / OPTIM.format(0), allow=[c for c in allowed if c is not left_out])
    flipped = tmp_path / "flipped.pt"
    shutil.copy(step_4 / OPTIM.format(1), flipped)
    flip_tensor_byte(flipped)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        safe_load.load(flipped, allow=allowed)

    # Each damage, judged before any process group: step_4 is skipped, naming the file.
    for case, (damages, note) in DS_CASES.items():
        ckpt = tmp_path / case.replace(" ", "_") / "checkpoints"
        shutil.copytree(ref / "checkpoints", ckpt)
        for name, damage in damages:
            damage(ckpt / "step_4" / name)
        name, notes = resume.resume_point(ckpt, identity)
        assert name == "step_2" and note in notes[-1], (case, notes)

    # One resumed launch: from step_2, the same loss curve bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    (resumed / "summary.json").unlink()
    truncate(resumed / "checkpoints" / "step_4" / OPTIM.format(1))
    proc = launch(resumed, store.path, "--resume")
    assert DS_CASES["truncated optimizer shard"][1] in proc.stdout + proc.stderr
    assert "at step 2" in proc.stdout
    again = json.loads((resumed / "summary.json").read_text())
    assert again["resumed_from"] == 2 and again["losses"] == losses
    assert resume.resume_point(resumed / "checkpoints", identity) == ("step_4", [])  # rewritten whole


@pytest.mark.dist
def test_deepspeed_and_sharded_loads_refuse_crafted_files(tmp_path):
    """DeepSpeed's own loader (ZeRO-2 model states and optimizer shard) and load_sharded, each
    given a file whose pickle would create a file: refused, nothing created; intact ZeRO-2 and
    ZeRO-3 checkpoints load through the same safe loader; a flipped bit names its file."""
    report_path = tmp_path / "report.json"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()),
           str(ROOT / "tests" / "dist" / "checkpoint_fault_worker.py"), "--dir", str(tmp_path),
           "--out", str(report_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and report_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    for case in ("clean_zero2", "clean_zero3"):
        assert report[case] == {"error": None, "result": {"step": 2}}, report[case]
    assert report["clean_sharded"]["error"] is None
    for case in ("crafted_model_states", "crafted_optim_states", "crafted_sharded"):
        row = report[case]
        assert row["type"] == "CheckpointError" and row["error"].startswith(f"{row['file']}: refused"), row
        assert not row["created"]
    row = report["flipped_optim_states"]
    assert row["type"] == "CheckpointError" and row["file"] in row["error"]
    assert "truncated or corrupted" in row["error"]
