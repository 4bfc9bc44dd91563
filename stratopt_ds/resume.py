"""Periodic training checkpoints and ``--resume`` for the main job (one process or DeepSpeed).

Layout under ``<out>/checkpoints/``::

    step_40/      one complete checkpoint: ``state.pt`` on one process, DeepSpeed's own files
                  under DeepSpeed; ``files.json`` (its torch files) and ``run.json`` (the run's
                  identity), written last
    step_60/
    latest        the tag of the newest *complete* checkpoint, e.g. ``step_60``

``latest`` is replaced atomically only after every file of the new checkpoint is written, so a
job killed while saving resumes from the previous checkpoint; nothing half-written is ever read.
The *client state* (step, data position, loss history, timers, RNG states and the options that
must not change) travels inside the checkpoint, so ``--resume`` continues the same run: the same
step, the same next batch, the same loss curve.

A checkpoint damaged later (a file truncated, deleted or emptied, ``run.json`` or ``latest``
garbled) does not end the run: :func:`resume_point` skips it, says so, and resumes from the
newest one that is whole. Loading never runs code from a file (:mod:`stratopt_ds.safe_load`).

DeepSpeed checkpoints go through ``engine.save_checkpoint`` / ``load_checkpoint``; they carry
our optimizer's whole state (the per-layer statistics ride in its ``state_dict``) and load back
at the same number of ranks. To change the number of ranks use
:mod:`stratopt_ds.zero.checkpoint`.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch

from . import safe_load
from .safe_load import CheckpointError  # noqa: F401  (this module's API too)

LATEST = "latest"
MANIFEST = "files.json"
# One DeepSpeed shard per data-parallel rank: zero_pp_rank_<r>_mp_rank_00_{optim,model}_states.pt
ZERO_SHARD = re.compile(r"(.*zero_pp_rank_)\d+(_mp_rank_\d+_(?:optim|model)_states\.pt)")

# Options that define the run: resuming with another value would silently change the experiment.
RUN_IDENTITY = ("optimizer", "hyperparams", "preset", "data", "tokenizer", "steps", "batch_size",
                "seq_len", "seed", "data_seed", "warmup_steps", "ranks")


def tag(step: int) -> str:
    return f"step_{step}"


def latest_tag(directory: Path) -> Optional[str]:
    """The tag of the newest complete checkpoint in ``directory``, or None."""
    marker = Path(directory) / LATEST
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    return name if (Path(directory) / name).is_dir() else None


def write_latest(directory: Path, name: str) -> None:
    tmp = Path(directory) / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, Path(directory) / LATEST)  # atomic: readers see the old or the new tag


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints up to the one ``latest`` names (never that
    one). A newer directory is a leftover of an earlier attempt that did not finish or was found
    unusable; it is kept for inspection, and the save of that step replaces it."""
    if keep <= 0:
        return
    current = latest_tag(directory)
    newest = int(current[5:]) if current and current[5:].isdigit() else None
    steps = sorted((int(p.name[5:]), p) for p in Path(directory).glob("step_*")
                   if p.is_dir() and p.name[5:].isdigit())
    steps = [(n, p) for n, p in steps if newest is None or n <= newest]
    for _, path in steps[:-keep]:
        if path.name != current:
            shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_identity(path: Path, identity: dict[str, Any]) -> None:
    """``run.json`` beside the checkpoint: readable before anything heavy is loaded."""
    (Path(path) / "run.json").write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n")


def resume_point(directory: Path, current: dict[str, Any]) -> tuple[str, list[str]]:
    """The newest usable checkpoint in ``directory``, and a note for the log (an empty list when
    ``latest`` was followed): what was wrong with ``latest`` and each newer checkpoint skipped.

    A checkpoint is usable when its ``run.json`` parses and every file it was saved with is
    there and whole (:func:`checkpoint_problem`: sizes and zip indexes only, never the tensors, so
    every rank of a large job can run this before the process group). An unusable one is
    reported and the previous one tried. A checkpoint of a *different* run is not corruption:
    ValueError naming every option that changed, and no older checkpoint is tried.
    Nothing to resume from: FileNotFoundError; nothing usable: :class:`CheckpointError`.
    """
    directory = Path(directory)
    candidates, latest_problem = _candidates(directory)
    if not candidates:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {directory}; run without "
                                "--resume to start afresh")
    said = [latest_problem] if latest_problem else []
    for name in candidates:
        problem = checkpoint_problem(directory / name, current)
        if problem is None:
            return name, ["; ".join(said + [f"resuming from {name}"])] if said else []
        said.append(f"checkpoint {name} is unusable ({problem})")
    raise CheckpointError(f"--resume: no usable checkpoint in {directory}: " + "; ".join(said)
                          + ". Restore an intact copy, or run without --resume to start afresh")


def has_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint whose save finished (``run.json`` written last),
    even when ``latest`` is damaged: ``--resume`` then picks among them (:func:`resume_point`)."""
    directory = Path(directory)
    return any((directory / name / "run.json").is_file() for name in _candidates(directory)[0])


def _candidates(directory: Path) -> tuple[list[str], Optional[str]]:
    """Checkpoints to try, newest first, and what is wrong with ``latest`` if it cannot be followed.

    ``latest`` names the newest complete checkpoint; a newer ``step_N`` may be half-written
    (DeepSpeed writes in place), so only the ones up to it are tried. When ``latest`` is
    missing, empty or names no directory, every ``step_N`` is tried: one whose save did not
    finish has no ``run.json`` (written last) and is skipped as unusable.
    """
    steps = sorted(((int(p.name[5:]), p.name) for p in directory.glob("step_*")
                    if p.is_dir() and p.name[5:].isdigit()), reverse=True)
    marker = directory / LATEST
    name = marker.read_text(errors="replace").strip() if marker.is_file() else ""
    if name and (directory / name).is_dir():
        newest = int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None
        return [name] + [s for n, s in steps if s != name and (newest is None or n < newest)], None
    if not steps:
        return [], None
    if not marker.is_file():
        return [s for _, s in steps], f"{marker} is missing"
    if not name:
        return [s for _, s in steps], f"{marker} is empty"
    return [s for _, s in steps], f"{marker} names {name!r}, which does not exist"


def checkpoint_problem(path: Path, current: dict[str, Any]) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be resumed from, or None; ValueError when it
    belongs to a different run (see :func:`resume_point`)."""
    path = Path(path)
    try:
        saved = json.loads((path / "run.json").read_text())
    except FileNotFoundError:
        return "run.json: missing, the save did not finish"
    except (ValueError, UnicodeDecodeError) as e:
        return f"run.json: unreadable ({e})"
    if not isinstance(saved, dict):
        return "run.json: not a run description"
    current = json.loads(json.dumps(current))  # tuples -> lists, as saved
    changed = [f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
               for key in RUN_IDENTITY if saved.get(key) != current.get(key)]
    if changed:
        raise ValueError(f"--resume: the checkpoint {path} belongs to a different run; changed "
                         "options:\n  " + "\n  ".join(changed)
                         + "\nresume with the same options, or use another --out")
    try:
        expected = expected_files(path, int(current.get("ranks") or 1))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{MANIFEST}: unreadable ({e})"
    bad = [f"{name}: {why}" for name in expected
           if (why := safe_load.check_file(path / name)) is not None]
    if bad:
        return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more files" if len(bad) > 3 else "")
    return None


def expected_files(path: Path, ranks: int) -> list[str]:
    """The files a checkpoint was saved with: its ``files.json``, or for a checkpoint written
    before there was one, ``state.pt`` (one process) or DeepSpeed's files, with every rank's
    shard of each kind that is present for some rank."""
    manifest = Path(path) / MANIFEST
    if manifest.is_file():
        return list(json.loads(manifest.read_text())["files"])
    names = {p.name for p in Path(path).glob("*.pt")}
    if not any(n.endswith("_model_states.pt") for n in names):
        return ["state.pt"]
    for name in list(names):
        shard = ZERO_SHARD.fullmatch(name)
        if shard:
            names |= {f"{shard[1]}{r}{shard[2]}" for r in range(ranks)}
    return sorted(names)


def write_manifest(path: Path) -> None:
    """``files.json``: every torch file of a complete checkpoint, so a missing one is noticed."""
    files = sorted(p.name for p in Path(path).glob("*.pt"))
    (Path(path) / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def save_single(directory: Path, step: int, model, optimizer, scheduler, client: dict,
                identity: dict) -> None:
    """One process: write ``step_N/state.pt`` through a temporary name, then point ``latest`` at it."""
    directory = Path(directory)
    final = directory / tag(step)
    tmp = directory / f".{tag(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "client": client}, tmp / "state.pt")
    write_identity(tmp, identity)
    write_manifest(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_latest(directory, tag(step))


def load_single(directory: Path, name: str, model, optimizer, scheduler) -> dict:
    """Load ``step_N/state.pt`` (no code runs: :mod:`stratopt_ds.safe_load`); return its client
    state. CheckpointError names the file when it is refused, truncated or corrupted."""
    path = Path(directory) / name / "state.pt"
    state = safe_load.load(path)
    missing = [key for key in ("model", "optimizer", "scheduler", "client")
               if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a stratopt-train checkpoint (no {', '.join(missing)}); "
                              "resume from a checkpoint that stratopt-train wrote")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["client"]


def save_deepspeed(directory: Path, step: int, engine, client: dict, identity: dict) -> None:
    """Every rank: DeepSpeed writes its files; rank 0 then marks the checkpoint complete
    (``run.json``, ``files.json``) and points ``latest`` at it."""
    import torch.distributed as dist

    path = Path(directory) / tag(step)
    if dist.get_rank() == 0:  # a checkpoint being overwritten is incomplete until all is written
        for name in ("run.json", MANIFEST):
            (path / name).unlink(missing_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(directory), tag=tag(step), client_state={"stratopt": client},
                           save_latest=False)  # our marker, written only once all ranks are done
    dist.barrier()
    if dist.get_rank() == 0:
        write_manifest(path)
        write_identity(path, identity)  # last: its presence means the checkpoint is complete
        write_latest(Path(directory), tag(step))
    dist.barrier()


def load_deepspeed(directory: Path, name: str, engine) -> dict:
    """Every rank: load ``name`` through DeepSpeed, every file unpickled by
    :func:`stratopt_ds.safe_load.load` with DeepSpeed's classes allowed and nothing else."""
    path = Path(directory) / name
    _check_same_checkpoint_on_every_rank(path)
    if engine.load_universal_checkpoint():
        # DeepSpeed reads universal checkpoints with torch.load(weights_only=False) directly
        raise CheckpointError(f"{path}: --resume loads DeepSpeed's own checkpoints, not universal "
                              "ones; remove checkpoint.load_universal from the DeepSpeed config "
                              "(to change the number of ranks use stratopt_ds.zero.checkpoint)")
    with _deepspeed_loads_checked(engine):
        loaded, client = engine.load_checkpoint(str(directory), tag=name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"{path}: DeepSpeed found no model states file in it; resume from "
                              "an earlier checkpoint or restore an intact copy")
    if not client or "stratopt" not in client:
        raise CheckpointError(f"{path}: not a stratopt-train checkpoint (no 'stratopt' client "
                              "state); resume from a checkpoint that stratopt-train wrote")
    return client["stratopt"]


@contextmanager
def _deepspeed_loads_checked(engine):
    """Route this engine's checkpoint reads (``engine.checkpoint_engine.load``: model states,
    ZeRO optimizer shards, MoE experts) through the safe loader while DeepSpeed loads."""
    reader = engine.checkpoint_engine
    allowed = safe_load.deepspeed_globals()
    own = reader.__dict__.get("load")  # normally absent: the class's method is used
    reader.load = lambda path, map_location=None: safe_load.load(path, map_location, allowed)
    try:
        yield
    finally:
        if own is None:
            del reader.load
        else:
            reader.load = own


def _check_same_checkpoint_on_every_rank(path: Path) -> None:
    """Each rank picked its checkpoint alone, before the process group; on storage that some
    rank sees differently they could disagree, and DeepSpeed would mix two checkpoints."""
    import torch.distributed as dist

    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, str(path))
    if len(set(names)) > 1:
        raise CheckpointError(f"--resume: the ranks chose different checkpoints {sorted(set(names))}; "
                              "every rank must see the same checkpoint directory (shared storage)")
